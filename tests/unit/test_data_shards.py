"""The shard writer: byte-identical to ``tarfile``'s output, atomic rename, readable back."""

from __future__ import annotations

import io
import tarfile

import numpy as np

from gptforge.data.shards import ShardWriter, read_shard


def tarfile_reference(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def test_writer_matches_tarfile_and_reads_back(tmp_path):
    docs = [np.arange(n, dtype="<u2") for n in (0, 1, 255, 256, 257, 3000)]
    writer = ShardWriter(tmp_path / "s.tar")
    for k, doc in enumerate(docs):
        writer.add(f"{k:010d}", doc.tobytes(), "u16", len(doc))
    assert (tmp_path / "s.tar.tmp").exists() and not (tmp_path / "s.tar").exists()
    size = writer.close()
    assert not (tmp_path / "s.tar.tmp").exists() and size == (tmp_path / "s.tar").stat().st_size
    tarfile_reference(tmp_path / "ref.tar",
                      [(f"{k:010d}.u16", d.tobytes()) for k, d in enumerate(docs)])
    assert (tmp_path / "s.tar").read_bytes() == (tmp_path / "ref.tar").read_bytes()
    back = read_shard(str(tmp_path / "s.tar"))
    assert [d.tolist() for d in back] == [d.tolist() for d in docs]

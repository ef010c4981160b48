"""gptforge: the repository's folders install as one namespace, ``gptforge.<part>``."""

from pathlib import Path

from setuptools import setup

PARTS = ["common", "launcher", "model", "data", "parallel", "slurm"]
HERE = Path(__file__).resolve().parent


def packages(part: str) -> list[str]:
    """``gptforge.<part>`` and every sub-package under it (folders with an ``__init__.py``)."""
    return sorted("gptforge." + ".".join(init.parent.relative_to(HERE).parts)
                  for init in (HERE / part).rglob("__init__.py"))


setup(
    name="gptforge",
    version="0.1.0",
    description="Distributed GPT training on megatron-core and DeepSpeed",
    python_requires=">=3.11",
    # gptforge itself is a namespace package
    packages=[name for part in PARTS for name in packages(part)],
    package_dir={f"gptforge.{p}": p for p in PARTS},
    package_data={"gptforge.slurm": ["*.tmpl", "*.sh"]},
    install_requires=[
        "torch==2.13.0",
        "megatron-core==0.16.1",
        "deepspeed==0.19.8",
        "webdataset>=1.0",
        "sentencepiece>=0.2",
        "mlflow==3.17.2",
        "pyyaml>=6",
        "numpy",
        "tqdm",
        "transformers",  # Hugging Face import/export and tokenizer folders
        "torchao==0.18.0",  # int8 weight-only inference (--quantize int8)
        "safetensors",
        "psutil",  # megatron-core's checkpoint writer processes need it (an extra upstream)
        "fastapi",  # gptforge serve (also present through mlflow)
        "uvicorn",
    ],
    extras_require={"test": ["pytest>=8", "ruff", "openai"]},
    entry_points={"console_scripts": ["gptforge=gptforge.launcher.cli.main:main"]},
)

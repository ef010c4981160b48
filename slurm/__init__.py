"""gptforge.slurm: Slurm job scripts (``gptforge launch slurm``), sweeps as job arrays, the
rank-side Slurm facts, and ``local_cluster.sh`` (a two-node Slurm on this host)."""

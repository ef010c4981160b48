"""gptforge: the repository's folders install as one namespace, ``gptforge.<part>``."""

from setuptools import setup

PARTS = ["launcher", "model", "data", "parallel", "slurm"]

setup(
    name="gptforge",
    version="0.1.0",
    description="Distributed GPT training on megatron-core and DeepSpeed",
    python_requires=">=3.11",
    packages=[f"gptforge.{p}" for p in PARTS],  # gptforge itself is a namespace package
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
        "safetensors",
        "psutil",  # megatron-core's checkpoint writer processes need it (an extra upstream)
    ],
    extras_require={"test": ["pytest>=8", "ruff"]},
    entry_points={"console_scripts": ["gptforge=gptforge.launcher.cli:main"]},
)

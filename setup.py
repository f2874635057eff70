"""Installs the odmrd package and its `odmrd` console script."""
from setuptools import setup

from odmr import __version__

setup(
    name="odmrd",
    version=__version__,
    description="On-Demand Mail Relay (RFC 2645) provider and customer",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["odmr"],
    package_data={"odmr": ["configspec.ini"]},
    install_requires=["configobj>=5.0.6"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={"console_scripts": ["odmrd = odmr.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Mail Transport Agents",
    ],
)

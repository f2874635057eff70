"""Installs the odmrd package and its `odmrd` console script."""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as fh:
        return fh.read()


__version__ = re.search(r'__version__ = "([^"]+)"', _read("odmr/__init__.py")).group(1)

setup(
    name="odmrd",
    version=__version__,
    description="On-Demand Mail Relay (RFC 2645) provider and customer",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["odmr"],
    package_data={"odmr": ["configspec.ini"]},
    install_requires=["configobj>=5.0.6", "idna>=3.0"],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={"console_scripts": ["odmrd = odmr.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Mail Transport Agents",
    ],
)

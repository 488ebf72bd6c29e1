"""Build mkiso and its Cython extension (mkiso/_fastcopy.pyx).

Cython 0.29 (Debian 12) and Cython 3 (PyPI) both build it.
"""

import re

from Cython.Build import cythonize
from setuptools import Extension, setup

with open("mkiso/__init__.py", encoding="utf-8") as handle:
    VERSION = re.search(r'__version__ = "([^"]+)"', handle.read()).group(1)

extensions = [
    Extension(
        "mkiso._fastcopy",
        ["mkiso/_fastcopy.pyx"],
        define_macros=[("_GNU_SOURCE", "1")],
    )
]

setup(
    name="mkiso",
    version=VERSION,
    description="Turn accession numbers into a patient DICOM CD/DVD",
    packages=["mkiso", "mkiso.dicom", "mkiso.disc", "mkiso.http"],
    package_data={"mkiso.http": ["desk.html", "desk.js"]},  # the desk page and its script, served at / and /desk.js
    # force: the C file is always this Cython's, never one another Cython left in the tree
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}, force=True),
    python_requires=">=3.10",  # zip(strict=True), dataclass(slots=True)
    install_requires=["waitress>=2.1", "PyYAML>=5.4", "pydicom>=2.3", "prometheus_client>=0.16"],
    entry_points={"console_scripts": ["mkiso-server = mkiso.server:main", "mkiso-audit = mkiso.audit:main",
                                      "mkiso-verify = mkiso.disc.verify:main"]},
)

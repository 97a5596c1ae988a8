"""Only what setup.cfg cannot say: the optional C helper.

If no C compiler is available the build of _wsloop_speedups fails quietly
and wsloop installs as pure Python (it never needs the helper).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("_wsloop_speedups", ["speedups/_wsloop_speedups.c"], optional=True)])

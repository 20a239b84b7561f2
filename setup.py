"""The compiled modules (Linux): the relay of established sessions (epoll,
eventfd), the plain listener's batch accept and the reader of common upgrade heads.

Everything else about the package is in pyproject.toml.
"""

from setuptools import Extension, setup

FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension("wsgate.gateway._relay", ["src/wsgate/gateway/_relay.c"], extra_compile_args=FLAGS),
        Extension(
            "wsgate.gateway._accept", ["src/wsgate/gateway/_accept.c"], extra_compile_args=FLAGS
        ),
        Extension(
            "wsgate.gateway._heads", ["src/wsgate/gateway/_heads.c"], extra_compile_args=FLAGS
        ),
    ]
)

"""Build hook: compile protos/epp/v1/*.proto into epp/v1/ with grpcio-tools at build time.

Generated modules are never committed (see .gitignore); every build, editable or not, regenerates
them so they cannot go stale.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def compile_protos(root: Path) -> None:
    from grpc_tools import protoc  # build-time dependency (pyproject [build-system])

    proto_root = root / "protos"
    protos = sorted(str(p.relative_to(proto_root)) for p in (proto_root / "epp" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={root}",
            f"--grpc_python_out={root}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    (root / "epp" / "v1" / "__init__.py").touch()


class BuildWithProtos(build_py):
    def run(self) -> None:
        compile_protos(Path(__file__).resolve().parent)
        super().run()


setup(cmdclass={"build_py": BuildWithProtos})

"""errors.py's docstring tree is the reference for clients: it must list every error with the
HTTP status, gRPC code and parent the code really has, and every error must be public API.

(Pickling, real gRPC code names and "no error class outside errors.py" are checked in
test_config_and_errors.py; here: the tree, ``maas_ray.__all__`` and the codes as a whole.)
"""

import inspect
import pickle
import re
from pathlib import Path

import pytest

import maas_ray
from maas_ray import errors

pytestmark = pytest.mark.unit

# "    │   ├── ModelNotFoundError (404, NOT_FOUND)   comment"  /  "    MaasError (500, INTERNAL)"
_LINE = re.compile(r"^(?P<indent>[ │├└─]*?)(?P<name>[A-Z]\w+Error) \((?P<status>\d{3}), (?P<grpc>[A-Z_]+)\)")


def _defined_errors() -> dict[str, type]:
    return {
        name: cls for name, cls in vars(errors).items()
        if inspect.isclass(cls) and issubclass(cls, errors.MaasError) and cls.__module__ == errors.__name__
        and not name.startswith("_")
    }


def _tree() -> dict[str, tuple[int, str, str]]:
    """name -> (status, grpc code, parent name) as the docstring draws them."""
    out, stack = {}, []  # stack: (depth, name)
    for line in errors.__doc__.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        depth = len(m["indent"])
        while stack and stack[-1][0] >= depth:
            stack.pop()
        out[m["name"]] = (int(m["status"]), m["grpc"], stack[-1][1] if stack else "")
        stack.append((depth, m["name"]))
    return out


def _public_parent(cls: type) -> str:
    """The nearest public MaasError ancestor (private helpers such as _RetryableError are skipped)."""
    for base in cls.__mro__[1:]:
        if issubclass(base, errors.MaasError) and not base.__name__.startswith("_"):
            return base.__name__
    return ""


def test_the_tree_draws_every_error_with_its_real_codes_and_parent():
    drawn, defined = _tree(), _defined_errors()
    assert sorted(drawn) == sorted(defined), "errors.py's docstring tree and its classes differ"
    for name, cls in defined.items():
        assert drawn[name] == (cls.status_code, cls.grpc_code, _public_parent(cls)), name


def test_every_error_is_public_api():
    defined = set(_defined_errors())
    assert defined <= set(maas_ray.__all__), defined - set(maas_ray.__all__)
    assert defined == set(errors.__all__)
    for name in defined:
        assert getattr(maas_ray, name) is getattr(errors, name)


@pytest.mark.parametrize("cls", sorted(_defined_errors().values(), key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_codes_survive_pickling_and_are_well_formed(cls):
    grpc = pytest.importorskip("grpc")
    back = pickle.loads(pickle.dumps(cls("msg")))
    assert (back.message, back.status_code, back.grpc_code) == ("msg", cls.status_code, cls.grpc_code)
    assert 400 <= cls.status_code <= 599
    assert cls.grpc_code in grpc.StatusCode.__members__ and cls.grpc_code != "OK"
    # a client error is never INTERNAL; a server error never says the client was wrong
    if cls.status_code < 500:
        assert cls.grpc_code not in ("INTERNAL", "DATA_LOSS", "UNKNOWN"), cls
    else:
        assert cls.grpc_code not in ("INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED"), cls


def test_training_failures_are_typed():
    from maas_ray.errors import TrainingError

    assert (TrainingError.status_code, TrainingError.grpc_code) == (500, "INTERNAL")
    source = (Path(maas_ray.__file__).parent / "train" / "pipeline.py").read_text()  # no torch import
    assert "raise TrainingError(" in source and "raise MaasError(" not in source

"""Shared fixtures and test environment: offline, quiet, deterministic."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
# One CPU thread per process: the tests, their stage processes (`runtime.threads: 0` = torch's default,
# which follows this variable) and the background project builds share the machine's cores, and
# OpenMP threads that outnumber the cores spin and stall each other (10x and worse on 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
#: Set in pytest-xdist's worker processes (`make test` runs two).
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
#: The xdist group of every test module that uses a reproduced project: one worker runs them all, so
#: each project is built once per session.
PROJECT_GROUP = "projects"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests: on a shared 2-core CPU, two threads contending with other
    work make tiny training steps many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_mixtral():
    """A tiny random Mixtral (2 layers, 8 experts, top-2)."""
    from tests.factory import tiny_model

    return tiny_model("mixtral")


#: Session fixtures holding a tiny project that `dvc repro` completed; built in the background (_Projects).
PROJECT_FIXTURES = ("reproduced_project", "compared_project", "forced_project", "fine_grained_project")


def _module(item: pytest.Item) -> str:
    return item.nodeid.split("::")[0]


def _project_modules(items: list[pytest.Item]) -> set[str]:
    return {_module(item) for item in items if set(PROJECT_FIXTURES) & set(getattr(item, "fixturenames", ()))}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Test modules that use a reproduced project run last (each in its own order), so that the
    project is built while the other tests run (:class:`_Projects`); under pytest-xdist they form
    one group (``--dist loadgroup``), run by one worker while the other runs the rest."""
    late = _project_modules(items)
    items[:] = [i for i in items if _module(i) not in late] + [i for i in items if _module(i) in late]
    for item in items:
        if _module(item) in late:
            item.add_marker(pytest.mark.xdist_group(PROJECT_GROUP))


class _Build:
    """``build()`` run in a background thread, with the environment as it was at the start;
    :meth:`result` waits for it and raises what it raised."""

    def __init__(self, name: str, build: Callable[[], Path]) -> None:
        from tests.project import frozen_environ

        self._result: Path | None = None
        self._error: BaseException | None = None
        environ = dict(os.environ)

        def target() -> None:
            try:
                with frozen_environ(environ):
                    self._result = build()
            except BaseException as exc:  # noqa: BLE001 - raised again by result()
                self._error = exc

        self._thread = threading.Thread(target=target, name=name, daemon=True)
        self._thread.start()

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> Path:
        self.wait()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result


class _Projects:
    """The session's reproduced tiny projects, each built once, in a background thread, from the moment
    it is first asked for. Their stage processes use about one CPU core; the tests that run meanwhile
    use the other."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._tmp = tmp_path_factory
        self._builds: dict[str, _Build] = {}
        #: The projects this session's tests use.
        self.wanted: list[str] = []

    def start(self, name: str) -> _Build:
        from tests.project import TINY, merge, rerun_forced, reproduce, run_documented, run_twice

        if name not in self._builds:
            if name == "reproduced_project":
                dest = self._tmp.mktemp("reproduced") / "project"
                self._builds[name] = _Build(name, lambda: reproduce(dest, merge(TINY, {"search": {"r": 6}})))
            elif name == "compared_project":
                reproduced = self.start("reproduced_project")
                dest = self._tmp.mktemp("compared") / "project"
                self._builds[name] = _Build(name, lambda: run_twice(reproduced.result(), dest))
            elif name == "forced_project":
                reproduced = self.start("reproduced_project")
                dest = self._tmp.mktemp("forced") / "project"
                self._builds[name] = _Build(name, lambda: rerun_forced(reproduced.result(), dest))
            elif name == "fine_grained_project":
                from tests.test_profiles import fine_grained_line

                reproduced = self.start("reproduced_project")
                dest = self._tmp.mktemp("fine_grained") / "project"
                self._builds[name] = _Build(name, lambda: run_documented(reproduced.result(), dest, fine_grained_line()))
            else:
                raise KeyError(name)
        return self._builds[name]

    def join(self) -> None:
        for build in self._builds.values():
            build.wait()


@pytest.fixture(scope="session", autouse=True)
def _projects(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """As the session starts, begins building every reproduced project its tests use. Under xdist a
    worker cannot know at its start whether it will get the project group, so there the builds begin
    when the worker's first test asks for a project (:func:`_project`)."""
    projects = _Projects(tmp_path_factory)
    projects.wanted = [name for name in PROJECT_FIXTURES
                       if any(name in getattr(item, "fixturenames", ()) for item in request.session.items)]
    if XDIST_WORKER is None:
        for name in projects.wanted:
            projects.start(name)
    yield projects
    projects.join()  # no stage process outlives the session


def _project(projects: _Projects, name: str) -> Path:
    """The built project ``name``; the first request of a session also starts every other wanted build."""
    for other in projects.wanted:
        projects.start(other)
    return projects.start(name).result()


@pytest.fixture(scope="session")
def reproduced_project(_projects: _Projects) -> Path:
    """The tiny project (search.r 6) after one `dvc repro`, committed, with the modules each stage
    process imported in ``<project>/../imports``. Read-only: a test that changes it (or runs anything
    that writes to it) works on ``tests.project.clone_project`` of it."""
    return _project(_projects, "reproduced_project")


@pytest.fixture(scope="session")
def compared_project(_projects: _Projects) -> Path:
    """A clone of ``reproduced_project`` (search.r 6, tagged r6) after `dvc exp run -S search.r=4`,
    committed (tagged r4); every MLflow run in ``<project>/mlflow.db``. Shared by the UI, plots, team
    and bad-input tests."""
    return _project(_projects, "compared_project")


@pytest.fixture(scope="session")
def fine_grained_project(_projects: _Projects) -> Path:
    """A clone of ``reproduced_project`` after the README's fine-grained profile line (``dvc exp run -S
    model.embedded.architecture=qwen3_moe ...``), run as written; its output in ``<project>/../run.log``."""
    return _project(_projects, "fine_grained_project")


@pytest.fixture(scope="session")
def forced_project(_projects: _Projects) -> Path:
    """A clone of ``reproduced_project`` after `dvc repro -f` (every stage rerun, inputs unchanged);
    what it printed is in ``<project>/../repro.log``."""
    return _project(_projects, "forced_project")

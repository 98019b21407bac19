"""Thread defaults: one per physical core this process may use, never more (clipforge.threads)."""

from __future__ import annotations

import multiprocessing
import time

import pytest

from clipforge import threads
from clipforge.errors import ConfigError


def _fake_cpus(root, cores):
    for cpu, core in enumerate(cores):
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "physical_package_id").write_text("0\n")
        (topology / "core_id").write_text(f"{core}\n")


def test_smt_siblings_count_once_and_the_quota_caps(tmp_path, monkeypatch):
    _fake_cpus(tmp_path / "cpu", [0, 0, 1, 1, 2, 2, 3, 3])  # 4 cores, 2 hardware threads each
    monkeypatch.setattr(threads, "SYS_CPU", tmp_path / "cpu")
    monkeypatch.setattr(threads, "_affinity", lambda: set(range(8)))
    monkeypatch.setattr(threads, "CGROUP", tmp_path / "cgroup")
    assert threads.physical_cores() == 4
    assert threads.physical_cores({0, 1, 2}) == 2  # an affinity mask of three siblings' CPUs
    assert threads.cgroup_cpu_limit() is None and threads.available_cores() == 4
    (tmp_path / "cgroup").mkdir()
    (tmp_path / "cgroup" / "cpu.max").write_text("250000 100000\n")  # docker --cpus 2.5
    assert threads.cgroup_cpu_limit() == 2.5 and threads.available_cores() == 2
    (tmp_path / "cgroup" / "cpu.max").write_text("max 100000\n")
    assert threads.available_cores() == 4


def test_default_shares_cores_among_local_ranks_and_respects_omp(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert threads.default_threads() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun --nproc_per_node 4
    assert threads.default_threads() == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3


def test_auto_leaves_out_busy_cores(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.2: 2.6)
    assert threads.choose_threads("auto") == 1
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.2: 0.2)
    assert threads.choose_threads("AUTO") == 4
    monkeypatch.setattr(threads, "busy_cores", lambda seconds=0.2: 9.0)
    assert threads.choose_threads("auto") == 1  # never zero


@pytest.mark.parametrize("bad", ["x", "0", 0, -1, True, 1.5])
def test_bad_thread_counts_are_one_sentence(bad):
    with pytest.raises(ConfigError, match="threads must be a positive whole number or 'auto'"):
        threads.choose_threads(bad)
    assert threads.choose_threads("3") == threads.choose_threads(3) == 3


def _spin(stop):
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def test_busy_cores_sees_another_process(monkeypatch):
    if not threads.PROC_STAT.is_file():
        pytest.skip("no /proc/stat on this system")
    stop = multiprocessing.Event()
    spinner = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
    spinner.start()
    try:
        time.sleep(0.3)
        assert threads.busy_cores(0.5) >= 0.6  # one core spinning (plus whatever else runs)
    finally:
        stop.set()
        spinner.join()


def test_cli_and_config_take_auto(tmp_path):
    from clipforge.cli.main import build_parser
    from clipforge.training.config import load_train_config

    args = build_parser().parse_args(["eval", "--model", "m", "--threads", "auto"])
    assert args.threads == "auto"
    assert load_train_config("examples/synthetic.toml", {"threads": "auto"}).threads == "auto"
    with pytest.raises(ConfigError, match="'threads' must be an integer or \"auto\""):
        load_train_config("examples/synthetic.toml", {"threads": "many"})

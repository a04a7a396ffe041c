"""No silent stalls, without Ray: what the graph asks for (from the stage configs), the fit
arithmetic and its messages, the autoscaler report's reading, and the watchdog raising in the
main thread through the same handler as SIGTERM (tests/integration/test_stalls.py runs both on
a real Ray)."""

from __future__ import annotations

import threading

import pytest

from pipeline.capacity import capacity_problem, config_node_types
from pipeline.config import RenderConfig
from pipeline.dataflow import RAY_STEP_CPUS, resource_plan
from pipeline.driver import raise_in_main_thread, terminate_as_exception
from pipeline.run import check
from pipeline.sample_catalog import make_catalog
from pipeline.watchdog import Stalled, StallWatchdog


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> str:
    return make_catalog(str(tmp_path_factory.mktemp("catalog")), n_pairs=2, bad_rows=False, sizes=[(64, 48)])


def _plan(catalog, model, tmp_path, gpus: float = 0.0, **settings):
    cfg = RenderConfig(manifest=catalog, output=str(tmp_path / "out"), model=model, **settings)
    return resource_plan(check(cfg, probe_output=False), gpus)


def test_the_plan_is_the_stage_configs_and_rays_own_steps(catalog, tiny_model_dir, tmp_path):
    plan = _plan(catalog, tiny_model_dir, tmp_path, gpus=1.0, actors=(2, 3), cpus_per_actor=2.0, cpu_stage_cpus=0.25)
    assert (plan.actor, plan.min_actors) == ({"CPU": 2.0, "GPU": 1.0}, 2)
    assert plan.tasks == {
        "read": {"CPU": 0.25},
        "resume": {"CPU": 0.25},
        "hash shuffle": {"CPU": RAY_STEP_CPUS},
        "repartition": {"CPU": RAY_STEP_CPUS},
        "prepare": {"CPU": 0.25},
        "finish": {"CPU": 0.25},
    }


def test_two_one_cpu_actors_on_two_cpus_are_refused_with_the_numbers(catalog, tiny_model_dir, tmp_path):
    plan = _plan(catalog, tiny_model_dir, tmp_path, actors=(2, 2), cpus_per_actor=1.0)
    assert capacity_problem(plan, [{"CPU": 2.0}], (2, 2)) == (
        "--actors 2,2 needs 2 x 1.0 CPU for the model actors plus 1.0 CPU for one hash shuffle/repartition task "
        "(read/resume/prepare/finish take less) = 3.0 CPUs; the cluster has 2.0 CPUs and no autoscaler: "
        "lower --actors or --cpus-per-actor (or add nodes)"
    )
    # the defaults fit exactly (measured: one 1-CPU actor and the 1-CPU shuffle tasks progress on 2 CPUs)
    default = _plan(catalog, tiny_model_dir, tmp_path)
    assert capacity_problem(default, [{"CPU": 2.0}], (1, 1)) is None
    assert capacity_problem(default, [{"CPU": 1.5}], (1, 1)) is not None


def test_gpus_and_custom_resources_are_checked_too(catalog, tiny_model_dir, tmp_path):
    gpu = _plan(catalog, tiny_model_dir, tmp_path, gpus=1.0, actors=(2, 2), gpus_per_actor=1.0)
    problem = capacity_problem(gpu, [{"CPU": 16.0, "GPU": 1.0}], (2, 2))
    assert problem.startswith("--actors 2,2 needs 2 x 1.0 GPU for the model actors = 2.0 GPUs; the cluster has 1.0")
    assert "--gpus-per-actor" in problem
    pinned = _plan(catalog, tiny_model_dir, tmp_path, actor_resources={"gpu_node": 1})
    assert "actor_resources 'gpu_node'" in capacity_problem(pinned, [{"CPU": 16.0}], (1, 1))
    assert capacity_problem(pinned, [{"CPU": 16.0, "gpu_node": 1.0}], (1, 1)) is None


def test_an_actor_cannot_span_nodes(catalog, tiny_model_dir, tmp_path):
    plan = _plan(catalog, tiny_model_dir, tmp_path, actors=(3, 3), cpus_per_actor=1.0)
    three = [{"CPU": 1.5}] * 3  # 4.5 CPUs in all, more than the 4.0 needed, but 1 actor per node
    problem = capacity_problem(plan, three, (3, 3))
    assert "an actor cannot span nodes" in problem and "hold only 2 of them beside the task" in problem
    assert capacity_problem(plan, [{"CPU": 1.5}, {"CPU": 1.5}, {"CPU": 2.0}], (3, 3)) is None  # the task on the third
    small = _plan(catalog, tiny_model_dir, tmp_path, cpus_per_actor=0.5)
    assert "no node has room for that task" in capacity_problem(small, [{"CPU": 0.75}] * 4, (1, 1))


def test_the_read_only_autoscaler_is_no_autoscaler():
    node = "615bed6881d307f1ed938f183b9112e592b6b7653b87e1fb859a1c2c"
    local = {"active_nodes": {f"node_{node}": 1}, "node_type_mapping": {node: f"node_{node}"}}
    assert config_node_types(local) == []  # a local Ray, or a hand-started `ray start` cluster
    kuberay = {"active_nodes": {}, "pending_launches": {"gpu": 2}, "node_type_mapping": {node: "headgroup"}}
    assert config_node_types(kuberay) == ["gpu", "headgroup"]


def _watched(watchdog: StallWatchdog, batches) -> list:
    restore = terminate_as_exception()
    try:
        return list(watchdog.watch(batches))
    finally:
        restore()


def test_a_stream_that_waits_is_interrupted_in_the_main_thread():
    def stuck():
        yield "first"
        threading.Event().wait(120)  # a blocking wait in C, as Ray's iterator may block: a real signal ends it
        yield "never"

    watchdog = StallWatchdog(0.5, lambda executors: "stage X waits for Y", raise_in_main_thread)
    with pytest.raises(Stalled) as stalled:
        _watched(watchdog, stuck())
    assert str(stalled.value) == (
        "no progress for 0.5 s (no batch reached the driver since batch 1, no step finished a task): "
        "stage X waits for Y (--stall-timeout-s)"
    )


def test_a_stream_that_moves_is_left_alone_and_zero_disables():
    def steady():
        for i in range(4):
            threading.Event().wait(0.2)
            yield i

    assert _watched(StallWatchdog(2.0, lambda executors: "", raise_in_main_thread), steady()) == [0, 1, 2, 3]
    assert _watched(StallWatchdog(0, lambda executors: "", raise_in_main_thread), steady()) == [0, 1, 2, 3]


def test_a_stop_whose_exception_was_swallowed_is_raised_again_between_steps():
    """A SIGTERM landing inside an import that swallows exceptions (a Cython module's init turns
    it into a warning) still stops the run: the driver's next `raise_if_stopped` raises it."""
    import os
    import signal

    from pipeline.driver import Terminated, raise_if_stopped

    restore = terminate_as_exception()
    try:
        raise_if_stopped()  # not asked to stop: nothing
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Terminated:
            pass  # what the swallowing library does
        with pytest.raises(Terminated, match="stopped by SIGTERM"):
            raise_if_stopped()
    finally:
        restore()
    terminate_as_exception()()  # a new run starts with no stop recorded
    raise_if_stopped()

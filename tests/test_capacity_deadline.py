"""The starvation rule of the capacity deadline (`ray_cluster.capacity.CapacityClock`), in plain Python. On the
autoscaling cluster (tests/test_autoscaling_job.py): the whole job, with its experts queued behind each other and
its nodes launched as it goes, runs under a 30 s deadline without tripping it, and a job for a node group that may
not grow fails within its deadline, naming the label, with nothing of it left asking for nodes.
"""

from __future__ import annotations

import pytest

from moedisco.config.loading import build_spec
from ray_cluster.capacity import CapacityClock, CapacityTimeout, Demand, Starved, TierState, autoscaler_note
from tests.conftest import tiny_spec_dict

A100 = Demand("finetune_tier", "gpu_type", "A100", {"CPU": 1, "GPU": 1}, autoscaled=True,
              node_groups={"expensive-a100": 0})
CHEAP = Demand("submodel_tier", "gpu_type", "4090", {"CPU": 1, "GPU": 1}, autoscaled=True)


def unmet(demand: Demand) -> TierState:
    """The cluster as a starved label shows it: a request pending, no node of the label in use."""
    return TierState(num_pending=1, num_busy=0)


# --- the rule ----------------------------------------------------------------------------------------------------

def test_work_waiting_for_an_idle_tier_is_starved_after_the_timeout():
    clock = CapacityClock(timeout_s=10, confirm_s=0)
    clock.submitted(("finetune", None), A100, now=100.0)
    assert clock.starved(now=110.0, cluster=unmet) is None
    starved = clock.starved(now=110.5, cluster=unmet)
    assert starved.key == ("finetune", None) and starved.waited_s == pytest.approx(10.5)


def test_work_that_arrived_or_finished_is_not_starved():
    clock = CapacityClock(timeout_s=10, confirm_s=0)
    clock.submitted(("merge", None), CHEAP, now=0.0)
    clock.submitted(("finetune", None), A100, now=0.0)
    clock.arrived(("merge", None), now=3.0)
    clock.finished(("finetune", None), now=4.0)  # failed, say: it waits no more
    assert clock.starved(now=100.0, cluster=unmet) is None and not clock.waiting()


def test_experts_queued_behind_running_ones_are_not_starved():
    """A tier's clock stands still while work of it runs, and restarts at each start or finish on it."""
    clock = CapacityClock(timeout_s=10, confirm_s=0)
    for expert in range(4):
        clock.submitted(("submodel", expert), CHEAP, now=0.0)
    clock.arrived(("submodel", 0), now=2.0)
    clock.arrived(("submodel", 1), now=2.0)
    assert clock.starved(now=500.0, cluster=unmet) is None  # experts 2 and 3 wait on 0 and 1, however long they train
    clock.finished(("submodel", 0), now=500.0)
    clock.arrived(("submodel", 2), now=503.0)
    clock.finished(("submodel", 1), now=504.0)
    clock.finished(("submodel", 2), now=505.0)
    assert clock.starved(now=515.0, cluster=unmet) is None  # expert 3: 10 s since the tier's last progress
    starved = clock.starved(now=515.5, cluster=unmet)
    assert starved.key == ("submodel", 3) and starved.idle_s == pytest.approx(10.5)
    assert starved.waited_s == pytest.approx(515.5)


def test_progress_on_another_tier_does_not_count():
    clock = CapacityClock(timeout_s=10, confirm_s=0)
    clock.submitted(("finetune", None), A100, now=0.0)
    clock.submitted(("merge", None), CHEAP, now=0.0)
    clock.arrived(("merge", None), now=1.0)
    assert clock.starved(now=10.5, cluster=unmet).key == ("finetune", None)


def test_a_trainer_started_anew_waits_from_then():
    clock = CapacityClock(timeout_s=10, confirm_s=0)
    clock.submitted(("submodel", 0), CHEAP, now=0.0)
    clock.arrived(("submodel", 0), now=1.0)
    clock.finished(("submodel", 0), now=50.0)  # preempted: its result came
    clock.submitted(("submodel", 0), CHEAP, now=50.0)
    assert clock.starved(now=59.0, cluster=unmet) is None and clock.starved(now=60.5, cluster=unmet) is not None


def test_the_cluster_has_the_last_word():
    """Workers report their node only once they run: a label with nothing pending is placing or starting its work,
    and one whose nodes are in use (another job's too) makes progress, which restarts its clock."""
    clock = CapacityClock(timeout_s=10, confirm_s=0)
    clock.submitted(("submodel", 0), CHEAP, now=0.0)
    clock.submitted(("submodel", 1), CHEAP, now=0.0)
    asked = []

    def starting(demand: Demand) -> TierState:
        asked.append(demand.selector)
        return TierState(num_pending=0, num_busy=0)

    assert clock.starved(now=15.0, cluster=starting) is None
    assert asked == ["gpu_type=4090"]  # once per label
    assert clock.starved(now=30.0, cluster=lambda demand: TierState(num_pending=2, num_busy=1)) is None
    assert clock.starved(now=39.0, cluster=unmet) is None  # in use at 30 s: the clock restarted then
    starved = clock.starved(now=40.5, cluster=lambda demand: TierState(num_pending=2, num_busy=0))
    assert starved.key == ("submodel", 0) and starved.num_pending == 2 and starved.waited_s == pytest.approx(40.5)


def test_starvation_is_confirmed_at_every_look_for_a_while():
    """A placement group just created is pending for a moment while the nodes are still idle: one look is not
    enough."""
    clock = CapacityClock(timeout_s=10, confirm_s=5)
    clock.submitted(("finetune", None), A100, now=0.0)
    assert clock.starved(now=11.0, cluster=unmet) is None
    assert clock.starved(now=14.0, cluster=lambda demand: TierState(num_pending=0, num_busy=0)) is None  # placed?
    assert clock.starved(now=15.0, cluster=unmet) is None  # the confirmation starts again
    assert clock.starved(now=19.5, cluster=unmet) is None
    starved = clock.starved(now=20.0, cluster=unmet)
    assert starved.confirm_s == pytest.approx(5.0) and starved.waited_s == pytest.approx(20.0)
    assert CapacityClock(timeout_s=900).confirm_s == 30 and CapacityClock(timeout_s=5).confirm_s == 5


def test_the_error_names_the_stage_label_resources_and_wait():
    note = autoscaler_note(Demand("finetune_tier", "gpu_type", "A100", {"CPU": 1, "GPU": 1}), gcs_address="")
    error = CapacityTimeout(Starved(("finetune", None), A100, waited_s=905.2, idle_s=901.0, timeout_s=900,
                                    num_pending=1, confirm_s=30), note)
    message = str(error)
    for part in ("stage finetune", "finetune_tier", "gpu_type=A100", "1 CPU, 1 GPU", "905 s",
                 "capacity_timeout_s = 900", "holds 1 request(s)", "for the last 30 s", "no autoscaler"):
        assert part in message, (part, message)
    assert "expert 3" in str(CapacityTimeout(Starved(("submodel", 3), CHEAP, 11, 11, 10)))


def test_demand_of_a_tier_reads_the_spec(tmp_path):
    spec = build_spec(tiny_spec_dict(tmp_path / "job", resources={"node_groups": {"expensive-a100": {"max_nodes": 0}}}))
    demand = Demand.of(spec, "finetune_tier", autoscaled=True)
    assert demand.selector == "gpu_type=A100" and demand.resources == {"CPU": 1, "GPU": 1}
    assert demand.node_groups == {"expensive-a100": 0}
    typo = Demand("finetune_tier", "gpu_type", "A10O", {"CPU": 1, "GPU": 1}, autoscaled=True)
    assert "declares no node group of gpu_type=A10O" in autoscaler_note(typo, gcs_address="")


# --- on Ray ------------------------------------------------------------------------------------------------------

# Shorter than a cheap trainer takes to start here (its workers report their node only once they run: the cluster's
# view tells a slow start from starvation), and than the time the job's four experts queue for its two cheap nodes.
TIMEOUT_S = 5.0
MARGIN_S = 25.0  # the cluster's confirmation (as long as the timeout), the driver's polls, the autoscaler note

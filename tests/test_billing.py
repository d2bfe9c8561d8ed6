"""The billed cost's attribution rule (moedisco.planning.billing) and the price tables it reads."""

import random
from datetime import datetime, timezone

import pytest

from moedisco.config.loading import SpecError, load_spec
from moedisco.config.resources import ResourcesConfig
from moedisco.planning.billing import NodeLife, Use, attribute, price_group, summarize
from tests.helpers import REPO

EXAMPLES = REPO / "examples"
RESOURCES = ResourcesConfig(idle_timeout_s=100.0)


def by_kind(bill, job):
    kinds: dict[str, float] = {}
    for span in bill.for_job(job):
        kinds[span.kind] = kinds.get(span.kind, 0.0) + span.seconds
    return kinds


def test_one_job_pays_boot_work_waits_and_the_idle_timeout_and_the_cluster_the_rest():
    node = NodeLife(node="n1", group="cheap-4090", requested_at=0.0, started_at=40.0, ended_at=600.0)
    uses = [Use(job="a", node="n1", start=50.0, end=150.0, stage="submodel", expert=0, round=0),
            Use(job="a", node="n1", start=200.0, end=300.0, stage="submodel", expert=0, round=1)]
    bill = attribute([node], uses, RESOURCES, now=1000.0, job_starts={"a": 0.0})
    assert by_kind(bill, "a") == pytest.approx({"boot": 50.0, "busy": 200.0, "between": 50.0, "idle": 100.0})
    assert by_kind(bill, None) == pytest.approx({"unclaimed": 200.0})  # kept past the idle timeout
    assert bill.seconds() == pytest.approx(600.0)
    assert bill.usd("a") == pytest.approx(400.0 / 3600 * 0.35)  # cheap-4090: one rtx4090 at its price
    boot = next(span for span in bill.for_job("a") if span.kind == "boot")
    assert (boot.stage, boot.expert, boot.round) == ("submodel", 0, 0)  # the use it was launched for


def test_a_node_that_was_there_before_the_job_is_not_its_boot():
    node = NodeLife(node="n1", group="cheap-4090", started_at=0.0, ended_at=100.0)
    bill = attribute([node], [Use(job="a", node="n1", start=60.0, end=100.0)], RESOURCES, now=100.0,
                     job_starts={"a": 50.0})
    assert by_kind(bill, "a") == pytest.approx({"busy": 40.0})
    assert by_kind(bill, None) == pytest.approx({"unclaimed": 60.0})


def test_jobs_sharing_a_node_split_it_by_their_share_and_the_last_user_pays_its_idle_time():
    node = NodeLife(node="n1", group="cheap-4090", started_at=0.0, ended_at=400.0,
                    resources={"CPU": 4.0, "GPU": 2.0})
    uses = [Use(job="a", node="n1", start=0.0, end=200.0, resources={"GPU": 1.0, "CPU": 1.0}),
            Use(job="b", node="n1", start=100.0, end=300.0, resources={"CPU": 1.0})]
    bill = attribute([node], uses, RESOURCES, now=400.0, job_starts={"a": 0.0, "b": 0.0})
    # 0-100: a alone; 100-200: a holds half (1 GPU of 2), b a quarter (1 CPU of 4): 2:1; 200-300: b alone.
    assert by_kind(bill, "a") == pytest.approx({"busy": 100 + 100 * 2 / 3})
    assert by_kind(bill, "b") == pytest.approx({"busy": 100 * 1 / 3 + 100, "idle": 100.0})
    assert bill.seconds() == pytest.approx(400.0)


def test_a_spot_node_pays_its_groups_price_and_a_dated_price_applies_from_its_date():
    changed = datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp()
    resources = ResourcesConfig(price_changes=[{"group": "cheap-4090-spot", "since": "2026-12-01T00:00:00Z",
                                                "price_per_hour": 0.10}])
    node = NodeLife(node="s", group="cheap-4090-spot", started_at=changed - 3600, ended_at=changed + 3600)
    bill = attribute([node], [Use(job="a", node="s", start=changed - 3600, end=changed + 3600)], resources,
                     now=changed + 7200, job_starts={"a": 0.0})
    assert bill.usd("a") == pytest.approx(0.20 + 0.10)
    assert sorted(span.price_per_hour for span in bill.for_job("a")) == [0.10, 0.20]


def test_nodes_are_priced_by_their_group_label_else_their_tier_and_market():
    resources = ResourcesConfig()
    assert price_group(resources, {"ray.io/node-group": "cheap-4090-spot"}) == "cheap-4090-spot"
    assert price_group(resources, {"gpu_type": "4090", "ray.io/market-type": "spot"}) == "cheap-4090-spot"
    assert price_group(resources, {"gpu_type": "4090", "market": "spot"}) == "cheap-4090-spot"  # the manifests' label
    assert price_group(resources, {"gpu_type": "A100"}) == "expensive-a100"
    assert price_group(resources, {"gpu_type": "H100"}) == "tier:H100"


def test_random_clusters_bill_every_node_second_once():
    rng = random.Random(0)
    for _ in range(50):
        nodes, uses = [], []
        for n in range(rng.randint(1, 4)):
            start = rng.uniform(0, 100)
            requested = start - rng.uniform(0, 30) if rng.random() < 0.7 else None
            end = start + rng.uniform(10, 500) if rng.random() < 0.8 else None
            nodes.append(NodeLife(node=f"n{n}", group=rng.choice(["cheap-4090", "expensive-a100"]),
                                  requested_at=requested, started_at=start, ended_at=end,
                                  resources={"CPU": 2.0, "GPU": 1.0}))
            for _ in range(rng.randint(0, 5)):
                a = rng.uniform(start, start + 400)
                uses.append(Use(job=rng.choice("abc"), node=f"n{n}", start=a,
                                end=a + rng.uniform(0, 100) if rng.random() < 0.9 else None,
                                resources={"CPU": rng.choice([0.5, 1.0, 2.0])}))
        now = 700.0
        bill = attribute(nodes, uses, RESOURCES, now=now, job_starts={"a": 0.0, "b": 50.0})
        assert bill.seconds() == pytest.approx(sum(node.seconds(now) for node in nodes))
        for node in nodes:  # and no stretch of a node is billed twice: its spans' node time adds up to its life
            spans = [span for span in bill.spans if span.node == node.node]
            assert sum(span.seconds for span in spans) == pytest.approx(node.seconds(now))
        rows = summarize(bill.spans)
        assert sum(row["usd"] for row in rows) == pytest.approx(bill.usd())


def test_a_partial_price_or_device_override_keeps_the_other_defaults():
    spec = load_spec(EXAMPLES / "tiny.yaml", ["resources.prices.rtx4090=0.29",
                                              "resources.devices.rtx4090.memory_gb=20"])
    assert spec.resources.prices["rtx4090"] == 0.29 and spec.resources.prices["a100"] == 2.28
    assert spec.resources.devices["rtx4090"].memory_gb == 20
    assert spec.resources.devices["rtx4090"].bf16_tflops == 165.2
    assert spec.resources.devices["a100"].memory_gb == 80
    groups = load_spec(EXAMPLES / "tiny.yaml", ["resources.node_groups.cheap-4090-spot.price_per_hour=0.15"])
    assert groups.resources.node_groups["cheap-4090-spot"].price_per_hour == 0.15
    assert groups.resources.node_groups["cheap-4090-spot"].market == "spot"
    assert set(groups.resources.node_groups) == {"cheap-4090", "cheap-4090-spot", "expensive-a100", "cpu"}
    with pytest.raises(SpecError, match="price_changes name node groups not in node_groups: nope"):
        load_spec(EXAMPLES / "tiny.yaml", ["resources.price_changes=[{group: nope, since: 2026-01-01T00:00:00Z, "
                                           "price_per_hour: 1}]"])
    with pytest.raises(SpecError, match="since"):  # a date without a time zone is refused
        load_spec(EXAMPLES / "tiny.yaml", ["resources.price_changes=[{group: cheap-4090, since: 2026-01-01, "
                                           "price_per_hour: 1}]"])


def test_a_node_outside_the_declared_groups_is_priced_from_the_groups_never_from_the_jobs_tiers():
    # Two spot A100s on a node no group declares: at the A100 group's price per GPU. A tier's device_type is the job's to
    # set, so it must not price anything: an unknown tier pays the dearest group's per-GPU price.
    cheap_tiers = ResourcesConfig(finetune_tier={"label": "A100", "device_type": "cpu"})
    for labels, gpus, usd in (({"gpu_type": "A100", "market": "spot"}, 2.0, 2 * 2.28), ({"gpu_type": "H100"}, 1.0, 2.28)):
        node = NodeLife(node="x", group=price_group(cheap_tiers, labels), started_at=0.0, ended_at=3600.0,
                        resources={"GPU": gpus})
        assert node.group.startswith("tier:")
        bill = attribute([node], [Use(job="a", node="x", start=0.0, end=3600.0)], cheap_tiers, now=3600.0)
        assert bill.usd("a") == pytest.approx(usd)


def test_a_long_gap_between_two_uses_of_one_job_is_not_its_and_a_fraction_of_a_gpu_holds_the_card():
    node = NodeLife(node="n1", group="cheap-4090", started_at=0.0, ended_at=10_000.0, resources={"GPU": 1.0})
    uses = [Use(job="a", node="n1", start=0.0, end=600.0), Use(job="a", node="n1", start=9_000.0, end=9_600.0)]
    bill = attribute([node], uses, RESOURCES, now=10_000.0, job_starts={"a": 0.0})
    assert by_kind(bill, "a") == pytest.approx({"busy": 1200.0, "between": 100.0, "idle": 100.0})
    assert by_kind(bill, None) == pytest.approx({"unclaimed": 10_000.0 - 1400.0})
    shared = [Use(job="a", node="n1", start=0.0, end=100.0, resources={"GPU": 0.01}),
              Use(job="b", node="n1", start=0.0, end=100.0, resources={"GPU": 0.5})]
    bill = attribute([node], shared, RESOURCES, now=200.0)
    assert by_kind(bill, "a")["busy"] == pytest.approx(50.0) == by_kind(bill, "b")["busy"]


def test_a_group_keeps_its_idle_nodes_for_its_own_timeout():
    node = NodeLife(node="n1", group="expensive-a100", started_at=0.0, ended_at=500.0)
    bill = attribute([node], [Use(job="a", node="n1", start=0.0, end=100.0)], RESOURCES, now=500.0)
    assert by_kind(bill, "a") == pytest.approx({"busy": 100.0, "idle": 60.0})  # k8s: expensive-a100's 60 s

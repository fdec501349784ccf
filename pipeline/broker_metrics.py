"""The broker's Prometheus metrics (one registry per broker process; see README's metrics list).

    m = BrokerMetrics(); m.accepted.inc(8); serve_metrics(m.registry, host, port)
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from pipeline.metrics import STALENESS_BUCKETS, new_registry, policy_version_gauge
from pipeline.queue import DROP_REASONS
from schemas.validate import REJECT_REASONS


class BrokerMetrics:
    def __init__(self) -> None:
        r = self.registry = new_registry("broker")
        self.depth_groups = Gauge("slipstream_queue_depth_groups", "Groups waiting in the queue.", registry=r)
        self.depth = Gauge("slipstream_queue_depth_trajectories", "Trajectories waiting in the queue.", registry=r)
        self.bytes = Gauge("slipstream_queue_bytes", "Bytes of trajectory arrays in the queue.", registry=r)
        self.in_flight = Gauge("slipstream_queue_credits_in_flight", "Group starts granted whose group has not arrived.", registry=r)
        self.capacity = Gauge("slipstream_queue_credits_available", "Group starts admission control would grant now.", registry=r)
        self.leased = Gauge("slipstream_queue_leased_groups", "Groups handed to a trainer and not yet committed.", registry=r)
        self.accepted = Counter("slipstream_broker_trajectories_accepted_total", "Trajectories accepted into the queue.", registry=r)
        self.consumed = Counter("slipstream_broker_trajectories_consumed_total", "Trajectories consumed by committed trainer steps.", registry=r)
        self.dropped = Counter("slipstream_broker_trajectories_dropped_total", "Trajectories removed without training, by reason.", ["reason"], registry=r)
        self.duplicates = Counter("slipstream_broker_duplicate_groups_total", "Resent groups recognised as already accepted.", registry=r)
        self.lease_expiries = Counter("slipstream_broker_lease_expiries_total", "Leases returned to the queue uncommitted.", registry=r)
        self.rejected = Counter("slipstream_broker_rejected_messages_total", "Messages rejected at the boundary, by reason.", ["reason"], registry=r)
        self.staleness = Histogram(
            "slipstream_broker_consumed_staleness", "Staleness (policy versions) of each consumed trajectory.",
            buckets=STALENESS_BUCKETS, registry=r,
        )
        self.producers_alive = Gauge("slipstream_broker_producers_alive", "Producers heard from within peer_timeout_s.", registry=r)
        self.producer_deaths = Counter("slipstream_broker_producer_deaths_total", "Producers declared dead (silent past peer_timeout_s).", registry=r)
        self.trainer_alive = Gauge("slipstream_broker_trainer_alive", "1 if a trainer was heard from within peer_timeout_s.", registry=r)
        self.version = policy_version_gauge(r)
        self.journal_bytes = Counter("slipstream_broker_journal_written_bytes_total", "Bytes appended to the queue journal.", registry=r)
        self.journal_torn = Counter("slipstream_broker_journal_torn_records_total", "Torn or corrupt journal records skipped on recovery.", registry=r)
        self.recovered = Gauge("slipstream_broker_recovered_groups", "Groups this broker recovered from the journal at start.", registry=r)
        self.retained_groups = Gauge("slipstream_queue_retained_groups", "Committed groups kept for replay until a trainer checkpoint covers their step.", registry=r)
        self.retained_trajectories = Gauge("slipstream_queue_retained_trajectories", "Trajectories of the retained groups (they count against the queue bound).", registry=r)
        self.retained_bytes = Gauge("slipstream_queue_retained_bytes", "Bytes of trajectory arrays of the retained groups (they count against the queue bound).", registry=r)
        self.replayed_groups = Counter("slipstream_queue_replayed_groups_total", "Retained groups served again to a resumed trainer and committed (not consumed twice).", registry=r)
        self.replayed_trajectories = Counter("slipstream_queue_replayed_trajectories_total", "Trajectories of the replayed groups.", registry=r)
        self.not_retained = Counter(
            "slipstream_queue_not_retained_groups_total",
            "Committed groups not retained for replay because one more batch would no longer fit beside the retained ones.", registry=r,
        )
        for reason in DROP_REASONS:
            self.dropped.labels(reason)
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)


def counter_values(counter: Counter) -> dict[str, float]:
    out = {}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels.get("reason", "")] = sample.value
    return out

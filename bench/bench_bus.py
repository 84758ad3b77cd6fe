"""Bus publish benchmark (not run by the tests): batches of invalidations made durable, per bus.

    .venv/bin/python bench/bench_bus.py [--batches 20] [--batch 100] [--amqp-url amqp://guest:guest@127.0.0.1:5672/%2F]
        [--redis-url redis://127.0.0.1:6379/15] [--nats-url nats://127.0.0.1:4222]

For RabbitMQ, ``RabbitMQBus.publish`` (persistent messages in one AMQP transaction per batch: publish every message,
then ``tx.commit``, whose reply says the broker stored them) is timed beside the same work written raw with pika on
the same durable queue in the same run: a channel in transaction mode, the same persistent publishes, one
``tx_commit`` per batch. The earlier baseline, pika's blocking publisher confirms (``confirm_delivery()``: pika's
``BlockingChannel`` waits for one confirm per message, it cannot batch them), is printed as an extra line: it made
one round trip per message against our one per batch, which is why the earlier "x0.06 of the baseline" flattered
us. Redis Streams and NATS JetStream ``publish`` are printed for comparison. Medians of ``--batches`` batches,
interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import uuid

from cachesync.bus import Invalidation, open_bus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="smoke run (numbers meaningless)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--amqp-url", default=os.environ.get("CACHESYNC_TEST_AMQP_URL",
                                                         "amqp://guest:guest@127.0.0.1:5672/%2F"))
    ap.add_argument("--redis-url", default=os.environ.get("CACHESYNC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    ap.add_argument("--nats-url", default=os.environ.get("CACHESYNC_TEST_NATS_URL", "nats://127.0.0.1:4222"))
    a = ap.parse_args()
    if a.quick:
        a.batches = 3
    msgs = [Invalidation((f"user:{i}", f"user_by_email:{i}@x"), str(i)) for i in range(a.batch)]
    bodies = [m.encode() for m in msgs]
    out: dict[str, float] = {}

    import pika

    name = "csbench" + uuid.uuid4().hex[:8]
    bus = open_bus(a.amqp_url, name, claim_idle=30.0)
    bus.consume("g", "c", 1, 0.0)  # the group's queue exists: messages are routed and stored
    conn = pika.BlockingConnection(pika.URLParameters(a.amqp_url))
    ch = conn.channel()
    ch.confirm_delivery()
    conn_tx = pika.BlockingConnection(pika.URLParameters(a.amqp_url))
    tx = conn_tx.channel()
    tx.tx_select()
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    ours, base, raw_tx = [], [], []
    for _ in range(a.batches):
        t0 = time.perf_counter()
        for b in bodies:
            tx.basic_publish(name, "", b, props, mandatory=True)
        tx.tx_commit()  # one round trip per batch: the broker has stored every message
        raw_tx.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        bus.publish(msgs)
        ours.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b in bodies:
            ch.basic_publish(name, "", b, props, mandatory=True)  # waits for the broker's confirm
        base.append(time.perf_counter() - t0)
    conn.close()
    conn_tx.close()
    bus.destroy()
    bus.close()
    out["rabbitmq, raw pika, one transaction per batch (baseline)"] = statistics.median(raw_tx)
    out["rabbitmq, RabbitMQBus.publish"] = statistics.median(ours)
    out["rabbitmq, raw pika, one blocking confirm per message"] = statistics.median(base)
    for label, url in (("redis streams, publish", a.redis_url), ("nats jetstream, publish", a.nats_url)):
        b2 = open_bus(url, "csbench" + uuid.uuid4().hex[:8])
        ts = []
        for _ in range(a.batches):
            t0 = time.perf_counter()
            b2.publish(msgs)
            ts.append(time.perf_counter() - t0)
        b2.destroy()
        b2.close()
        out[label] = statistics.median(ts)
    base_t = out["rabbitmq, raw pika, one transaction per batch (baseline)"]
    print(f"durable publish of a batch of {a.batch} invalidations, median of {a.batches} batches; load "
          "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    for k, v in out.items():
        print(f"  {k:58s} {v * 1000:8.2f} ms  ({v / a.batch * 1e6:6.0f} µs/message)  x{v / base_t:.3f} of the baseline")


if __name__ == "__main__":
    main()

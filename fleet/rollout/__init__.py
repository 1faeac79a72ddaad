"""Staged rollouts: a bundle reaches a target in waves, paced, and stops on what devices report.

model.py       the rollout's spec (target, waves, pacing, gates) and wave planning
gates.py       pure verdicts: failures, acceptance, p99 ratio, accuracy drop, RSS, throttling
evidence.py    reads outcomes and KPIs from the fleet database for the gates
store.py       the rollout tables (portable SQL) and the controller's lease
create.py      resolving a target (group, tag query, device list) and storing a new rollout
publisher.py   signed per-device desired documents, many at a time
controller.py  the loop that drives one rollout: start, observe, gate, advance, abort, roll back
runner.py      ``rollout run``: one connection, a controller per rollout it drives
views.py       read-only views: progress in ``fleet watch``, tags, inventory, report markers
cli.py         ``edgectl rollout ...`` and ``edgectl fleet history|tag|inventory``
"""

"""The per-node relay (docs/design.md "Relays"): relay.py the process, tally.py a round's aggregation, find.py how
an agent finds (or starts) its node's relay."""

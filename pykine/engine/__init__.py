"""The etcd data model: revisions, MVCC reads, transactions, compaction.

It speaks in etcd request messages and plain result records, and knows
nothing about SQL; backends store what it decides.
"""

"""The host: process spawning and argv construction (:mod:`.proc`), and the
quiesce protocol of nbdkit's pause filter (:mod:`.quiesce`).  Every external
program blockcrypt runs is started through here, so tests can check argv
without running anything.
"""

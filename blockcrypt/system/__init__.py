"""The host: argv construction (:mod:`.commands`), running programs and asking about
processes (:mod:`.proc`), mounts and block devices (:mod:`.devices`), the quiesce
protocol of nbdkit's pause filter (:mod:`.quiesce`) and the C library (:mod:`.libc`).
Every external program blockcrypt runs is started through here, so tests can check
argv without running anything.
"""

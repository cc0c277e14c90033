"""`opd bench`: throughput and overhead benchmarks (tables on stdout, JSON to a file).

    opd bench                      # all: pipeline (async vs sync), codec, redis, broadcast
    opd bench codec --json out.json
"""

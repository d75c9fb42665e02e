"""`zmserve bench`: measure a servable (or its bare shards) and write one JSON line per request.

One module per concern, in the order a run uses them:
  requests   what to send: JSON request lines or generated tensors (`RequestSpec`)
  records    one result line per request (`Record`)
  lines      reading JSON lines (request and result files share it); errors: `BenchError`
  writer     the thread that owns stdout and the progress line (`ResultWriter`)
  load       load against the service from threads: closed and open loop (`ServiceLoad`)
  processes  the same load spread over processes, their records merged (`--processes`)
  direct     the same calls on the bare MindIR shards, no service in between (`--direct`)
  summary    what a run amounts to (`Summary`): the table for people, one JSON object for scripts
  plot       the latency histogram and throughput-over-time figure
  cli        the `zmserve bench run|report` commands
"""

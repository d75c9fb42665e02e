"""Entry point of a MindSpore collective-group scheduler process (one per pipeline stage).

MindSpore's CPU collectives form a group around a scheduler: a process started with MS_ROLE=MS_SCHED whose
`init()` blocks until every member has joined and later left. The worker starts one per stage with
`StageGroup.start_scheduler`; this module is what that process runs.
"""

from mindspore.communication import init

if __name__ == "__main__":
    init()

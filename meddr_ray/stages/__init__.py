"""The Ray stages: bootstrap, instruct, train, index, evaluate and the pipeline that runs them in order.

Each is one function ``run_<stage>(cfg) -> StageResult`` (:mod:`meddr_ray.stages.registry`), shared by the CLI,
the job scripts and the tests.
"""

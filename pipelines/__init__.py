"""The reproducible pipeline: DVC stages from raw videos to tracked metrics, and the tools around it.

Three kinds of modules, told apart by where they live:

    pipelines/stages/   the DVC stages (dvc.yaml), each `python -m pipelines.stages.<stage>`:
                        synthesize -> manifest -> extract -> train -> evaluate. Entry points only:
                        arguments, then a call into the libraries; they share one entry helper
                        (pipelines.stages.entry: params, logging, process set-up, exit status 2 for
                        a configuration error) and never import each other.
    pipelines/tools/    the user's commands (`ms-temba`, pipelines.tools.cli): predict,
                        import-npy, convert-release, export-mstct, export / score.
    pipelines/*.py      libraries that the stages and tools share: config (params.yaml), manifest,
                        annotations, labels, data, training, evaluation, inference, bundle (the
                        model file), predictions (predict's output files), detections, viewer,
                        import_npy, io, process.

Importing the package does nothing; entry points call `pipelines.process.setup_process()`.
"""

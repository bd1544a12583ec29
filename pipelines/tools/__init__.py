"""The user's commands, `ms-temba <command>` (pipelines.tools.cli):

    predict           actions in new videos with a trained model (predict)
    import-npy        per-video .npy features -> feature shards (cli; the import is pipelines.import_npy)
    convert-release   an official release checkpoint -> a model file (convert_release)
    export-mstct      predictions in MS-TCT's layout (export)
    export, score     ActivityNet results: write ours, score anyone's (activitynet)
    compose, check    params.yaml from conf/, and its validation (cli)

Tools use the libraries (pipelines/*.py); no stage or library imports a tool.
"""

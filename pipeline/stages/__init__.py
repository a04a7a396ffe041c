"""The Ray Data stages of a render run, in graph order (`pipeline.dataflow` chains them):

    read_stage     manifest files -> rows tagged with their state bucket            CPU tasks
    resume_stage   per bucket (hash shuffle): conflicts, validation, render | reuse  CPU tasks
    scene_stage    per scene (hash shuffle; manifests with scene_id only): the plan  CPU tasks
    prepare_stage  fetch, decode, region, model inputs and hint                     CPU tasks
    render_stage   the model actor: batched DTC, best variant, identity score       GPU actor pool
    finish_stage   paste back, encode, write the image, stamp the row               CPU tasks

`faults.py` is the chaos tests' fault injection (YAML only). README.md's flow diagram and
docs/files.md follow this order and these names.
"""

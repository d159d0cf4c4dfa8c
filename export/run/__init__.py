"""The run itself: the command line, the pipeline, and the supervised worker process that builds the variants.

    cli         python -m export, export.tflite and export.onnx: options -> ExportConfig -> run_export -> exit status
    pipeline    run_export: validate, stage, supervise, TFLite Micro, checks, verdict, report, move into place
    supervisor  follows the worker process; a crash or hang fails one variant (or moves it to its next attempt)
    worker      builds and measures each variant with the registry's builder (export.variants)
    context     what a builder works with: the loaded model, the arrays, the ExportConfig, progress events
"""

"""The model as the user hands it over, and what the converters get instead (every rewrite checked).

    load         load_source_model: .keras (Keras 2 or 3), .h5, a SavedModel folder; a Keras 3 model through its
                 training=False SavedModel; ModelInfo, SourceModel
    predictions  what it outputs (probabilities, logits, a sigmoid unit), whether it fits the data, class_predictions
    rewrite      one graph walk: float16 policies as float32, static GroupNormalization, grouped convs for ONNX

(A Keras 3 model's tf_keras rebuild, for QAT, is toolkit.keras3, and models tfmot wrapped already are unwrapped
by toolkit.tfmot: training uses both too.)
"""

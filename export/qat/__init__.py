"""Quantisation-aware training with tfmot, for the qat_int8 variant.

    graph     the graph tfmot gets: inlined, training-only layers dropped, batch norm folded, ReLUs fused
    model     which layers tfmot quantises and how (schemes, quantize configs, coverage)
    finetune  the fine-tuning itself, with its divergence check
    build     qat_int8: each scheme in turn, or the quantisation-aware model as given; kept when not worse than int8
"""

"""Systematic outlier features (LLM.int8(), Dettmers et al. 2022) in MoE and dense LLMs.

Modules:
    configs     model specs (real sizes), VRAM plan, GPU count, broker query strings
    data        fixed-length token-id chunks from FineWeb-Edu or an offline packaged corpus
    models      model/tokenizer loading (hub id, local path, or the in-code ``tiny-moe``)
    extract     one pass over the model with nnsight (or torch hooks) reducing inside the trace
    analysis    LLM.int8() criteria, bootstrap CIs, cross-batch validation, sensitivity grid
    run         CLI: analyse one model on the current machine
    compare     CLI: comparison plots/tables across saved results
"""

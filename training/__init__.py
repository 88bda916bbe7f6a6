"""leapserve.training: the companion trainer that builds drafters for a target (`leapserve train ...`).

`data` has the target answer offline prompts and stores its features; `fspad` trains FSPAD feature drafters,
`adaspec` AdaSPEC (or DistillSpec) draft models, `export` writes FSPAD drafters in vLLM's EAGLE layout; `mdm`
trains masked diffusion LMs (LLaDA's loss) and `dparallel` distils them with dParallel's certainty forcing; `sft`
fine-tunes causal LMs on prompt/response pairs and `dart` trains silent thought into them (DART-style CoT and ST
pathways, CODI's self-distillation); `loop`, `checkpoint` and `evaluate` are what they share.
"""

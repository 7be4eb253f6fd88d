"""Analyses that explain probing results: attention statistics, frequency spectra, localisation.

One module per noun:
- `passes`: the shared image pass (subset, loader, forward) and its hooks (explicit attention, block outputs);
- `runs`: what every run shares (inputs from flags or a token cache, the output directory, the JSON header);
- `attention`, `frequency`: the statistics and spectra, and the `vitprobe analyze` runs that write them;
- `maxboxacc`: the MaxBoxAccV2 metric; `localization`: the maps it scores and the run that writes them;
- `plots`: figures drawn from the results JSON (no torch).
Blocks are numbered from 0 everywhere, as timm's `model.blocks[i]` and the token caches' `layers` are.
Nothing is imported here, so `vitprobe.analysis.plots` stays usable without torch.
"""

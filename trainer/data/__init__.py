"""From media to training batches: decoding and timing (``media``), the dataset listing (``dataset``), its
checks (``doctor``), the latent cache (``cache``), samples and batches (``batches``), which samples form
each batch (``batch_sampler``) and the demo's synthesised clips (``synth``)."""

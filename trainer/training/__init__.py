"""The training run: the loop and its step (``loop``), σ sampling and noising (``timesteps``), losses and
the audio balancer (``losses``), optimizers and schedules (``optim``), resumable state (``state``), the
audio supervision monitor (``monitor``), the preservation regularisers (``preservation``) and the
fixed-σ validation losses (``validation``)."""

"""The runtimes the trainer drives, behind one small interface (``interface``): the diffusers backend
(``diffusers_backend``, ``diffusers_encoders``, ``text_encoder``, ``text_connectors``, ``audio_frontend``) and
ComfyUI's (``comfyui``), plus the weight fingerprints both use (``fingerprint``)."""

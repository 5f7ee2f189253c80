"""Hearing and seeing the result: generation (``generation``), cache previews and A/B samples
(``previews``), validation samples during training (``validation_sampling``), the voice identity score
(``voice_score``) and the offline HTML report (``report_html``)."""

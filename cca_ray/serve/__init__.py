"""Stage `serve`: a Ray Serve deployment with an OpenAI-compatible images API.

    app.py     the deployment (batched decode per sampling settings) and `python -m cca_ray.serve`
    api.py     the HTTP contract: request validation, errors, responses (no Ray)
    assets.py  where the served model, image tokenizer and class prompts come from; MLflow image log
"""

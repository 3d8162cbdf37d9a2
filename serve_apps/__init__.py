"""The Ray Serve application of MedDr: retrieval-augmented diagnosis, VQA and reports over HTTP.

    Ingress (FastAPI: auth, limits, image intake)
      -> Generator (the student: one vision pass per image, batched generation)
           -> Retriever (the run's FAISS index, the version CURRENT names)

Modules, one concern each: ``schemas`` (request/response models), ``errors`` (the error shape and its mapping),
``images`` (image intake), ``retriever``, ``generator`` and ``ingress`` (the deployments), ``api`` (the HTTP
routes), ``openai_api`` (chat completions), ``metrics`` (dashboard metrics), ``meddr`` (the application builder
that ``serve run`` / ``serve deploy`` import) and ``launch`` (start and stop it from Python and the CLI).
"""

"""The HTTP bodies, by concern; pydantic, no Ray, no torch.

    openai      completion and chat requests, whole responses, the model list
    streaming   OpenAI stream chunks and server-sent events
    admin       the admin API's request bodies
"""

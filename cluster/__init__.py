"""Running lora-serve: launchers and jobs that sit on top of the serving code.

    serve_local     `make serve`: serve_config.yaml on an embedded local Ray, until Ctrl-C
    demo_adapters   train the demo adapters (a CLI; `demo_adapters: true` runs it before serving)
"""

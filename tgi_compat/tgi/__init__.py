"""The TGI spec layer: TGI's native routes (`/`, `/generate`, `/generate_stream`, ...)."""

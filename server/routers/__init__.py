"""One router per API surface: OpenAI images, the native API, operations."""

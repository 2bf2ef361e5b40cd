"""The pieces of `autodeploy serve` (autodeploy/serve.py builds the app from them): the engine on its
own thread, the request schema and its checks, OpenAI's error shape, metrics and tool-call parsing."""

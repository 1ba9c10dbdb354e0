"""An app's stop button: cancel a reply from another thread; the session stays usable.

python examples/cancellation.py ~/models/gpt-oss-20b
"""

import sys
import threading

import mlx_gptoss


def main() -> None:
    # lazy=False reads the weights in this thread; MLX evaluates lazy arrays only in the thread
    # that built them, and the generation below runs in a worker thread.
    model = mlx_gptoss.load(sys.argv[1] if len(sys.argv) > 1 else "openai/gpt-oss-20b", lazy=False)
    chat = model.chat(reasoning_effort="high")
    result = {}

    def worker():
        result["reply"] = chat.send("Write a very long story about a lighthouse.", max_tokens=4000)

    t = threading.Thread(target=worker)
    t.start()
    threading.Timer(5.0, chat.cancel).start()  # the user presses "stop" after 5 seconds
    t.join()
    reply = result["reply"]
    print(f"finish reason: {reply.finish_reason}; {reply.stats.generation_tokens} tokens generated")
    # the conversation continues normally, reusing the cache
    print(chat.send("In one sentence, what was the story going to be about?", max_tokens=300).final)


if __name__ == "__main__":
    main()

// ConsoleTest.cs: end-to-end checks of the npcforge C# client against a live `npcforge serve`.
//
// Usage: mono ConsoleTest.exe HOST PORT [CHARACTER]
//        mono ConsoleTest.exe --spawn EXECUTABLE "ARGUMENTS" [CHARACTER]   (starts the server itself)
// Checks the JSON reader/writer offline, then connects, lists the characters, holds a streamed two-turn
// conversation, reads the history, runs two chats at once on one connection, cancels a long reply, resets the
// conversation, provokes an error and closes a client mid-reply. With NPCFORGE_TOKEN set it uses that token and
// checks that a hello without it is refused. Prints one line per check; exits 0 only when every check passed.
using System;
using System.Collections.Generic;
using System.Linq;
using System.Text;
using System.Threading.Tasks;
using NpcForge;

static class ConsoleTest
{
    static int passed, failed;
    // Long enough that the reply is still streaming when the cancel lands, short enough to fit the tiny
    // model's context next to the persona prompt.
    const int LongReply = 512;
    // The same variable the server reads: a spawned server inherits it and then requires the token.
    static readonly string Token = string.IsNullOrEmpty(Environment.GetEnvironmentVariable("NPCFORGE_TOKEN"))
        ? null : Environment.GetEnvironmentVariable("NPCFORGE_TOKEN");

    static void Check(bool ok, string name, string detail = "")
    {
        if (ok) passed++; else failed++;
        Console.WriteLine((ok ? "ok   " : "FAIL ") + name + (ok || detail.Length == 0 ? "" : ": " + detail));
    }

    static async Task<T> Within<T>(Task<T> task, int seconds, string what)
    {
        if (await Task.WhenAny(task, Task.Delay(seconds * 1000)) != task)
            throw new TimeoutException(what + " took longer than " + seconds + " s");
        return await task;
    }

    static async Task Within(Task task, int seconds, string what)
    {
        if (await Task.WhenAny(task, Task.Delay(seconds * 1000)) != task)
            throw new TimeoutException(what + " took longer than " + seconds + " s");
        await task;
    }

    static string NoSpace(string s) { return new string(s.Where(c => !char.IsWhiteSpace(c)).ToArray()); }

    static bool Throws(string text)
    {
        try { Json.Parse(text); return false; }
        catch (FormatException) { return true; }
    }

    static void JsonChecks()
    {
        string tricky = "q\"b\\s/\n\r\t\b\f\u0001 é \u2028 😀";
        string written = Json.Write(tricky);
        Check(written == "\"q\\\"b\\\\s/\\n\\r\\t\\b\\f\\u0001 é \\u2028 😀\"", "json: string escaping", written);
        Check((string)Json.Parse(written) == tricky, "json: string round trip");
        var decoded = (string)Json.Parse("\"\\u00e9\\ud83d\\ude00\\/\"");
        Check(decoded == "é😀/" && decoded.Length == 4, "json: \\u escapes and a surrogate pair", decoded);
        Check(Json.Write("\ud800x") == "\"\\ud800x\"", "json: lone surrogate escaped", Json.Write("\ud800x"));
        var obj = (Dictionary<string, object>)Json.Parse(
            " {\"a\": [1, -2, 3.5, 1e3, -0.25E-2, true, false, null], \"b\": {\"c\": \"d\"}," +
            " \"big\": 12345678901234} ");
        var a = (List<object>)obj["a"];
        Check((long)a[0] == 1 && (long)a[1] == -2 && (double)a[2] == 3.5 && (double)a[3] == 1000.0 &&
              (double)a[4] == -0.0025 && (bool)a[5] && !(bool)a[6] && a[7] == null &&
              (long)obj["big"] == 12345678901234,
              "json: numbers and literals");
        string compact = Json.Write(obj);
        Check(compact == "{\"a\":[1,-2,3.5,1000,-0.0025,true,false,null],\"b\":{\"c\":\"d\"},\"big\":12345678901234}",
              "json: compact writing", compact);
        Check(Throws("{\"a\":1,}") && Throws("\"\\x\"") && Throws("01") && Throws("\"abc") && Throws("[1 2]") &&
              Throws("\"\\ud83\"") && Throws("\"a\nb\"") && Throws("{} x") && Throws("") && Throws("nul"),
              "json: malformed input rejected");
    }

    sealed class Reply
    {
        public readonly StringBuilder Tokens = new StringBuilder();
        public readonly StringBuilder Sentences = new StringBuilder();
        public int TokenCount;
        public ChatHandle Handle;
    }

    static Reply Start(NpcForgeClient client, string character, string session, string text, ChatOptions options,
                       Action<Reply> onFirstToken = null)
    {
        var reply = new Reply();
        reply.Handle = client.Chat(character, session, text, options,
            onToken: t =>
            {
                reply.Tokens.Append(t);
                if (++reply.TokenCount == 1 && onFirstToken != null) onFirstToken(reply);
            },
            onSentence: s => reply.Sentences.Append(s).Append(' '));
        return reply;
    }

    static void CheckReply(Reply reply, ChatResult done, string name)
    {
        Check(done.FinishReason == "stop" || done.FinishReason == "length", name + ": finish_reason",
              done.FinishReason);
        Check(reply.TokenCount > 0 && reply.Tokens.ToString() == done.Text, name + ": tokens add up to done.text",
              reply.TokenCount + " tokens, '" + reply.Tokens + "' vs '" + done.Text + "'");
        Check(NoSpace(reply.Sentences.ToString()) == NoSpace(done.Text), name + ": sentences cover the reply",
              "'" + reply.Sentences + "'");
        Check(done.PromptTokens > 0 && done.CompletionTokens > 0 && done.TotalS >= done.TtftS,
              name + ": usage and timings", done.PromptTokens + "/" + done.CompletionTokens);
    }

    /// <summary>Returns the character it talked to.</summary>
    static async Task<string> ServerChecks(string host, int port, string wanted)
    {
        var listener = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        listener.Start();
        int closedPort = ((System.Net.IPEndPoint)listener.LocalEndpoint).Port;
        listener.Stop();  // nothing listens there now
        try
        {
            using (await Within(NpcForgeClient.ConnectAsync("127.0.0.1", closedPort), 30, "connect")) { }
            Check(false, "connect: a closed port gives connect_failed", "connected");
        }
        catch (NpcForgeException e)
        {
            Check(e.Code == "connect_failed", "connect: a closed port gives connect_failed", e.Code);
        }
        if (Token != null)
        {
            try
            {
                using (await Within(NpcForgeClient.ConnectAsync(host, port), 30, "connect")) { }
                Check(false, "auth: hello without the token refused", "connected");
            }
            catch (NpcForgeException e)
            {
                Check(e.Code == "unauthorized", "auth: hello without the token refused", e.Code);
            }
        }
        using (var client = await Within(NpcForgeClient.ConnectAsync(host, port, Token, "console-test"), 30, "connect"))
        {
            client.BackgroundError += e => Console.WriteLine("background error: " + e.Message);
            Check(Wire(client.ServerInfo, "protocol") == "1", "hello: protocol 1");

            var characters = await Within(client.ListAsync(), 30, "list");
            Check(characters.Count > 0, "list: characters served", characters.Count.ToString());
            string character = wanted ?? characters[0].Id;
            Check(characters.Any(c => c.Id == character), "list: " + character + " is served");
            Console.WriteLine("character: " + character);

            var options = new ChatOptions { MaxTokens = 24, Temperature = 0.8, Seed = 7 };
            const string session = "console-test";
            // Fresh conversations, so that a rerun against the same server sees the same prompts (and replies).
            foreach (string s in new[] { session, "console-a", "console-b", "console-cancel" })
                await Within(client.ResetAsync(character, s), 30, "reset");
            string[] asks = { "Hello there! Who are you?", "Tell me about this place." };
            var answers = new List<string>();
            foreach (string ask in asks)
            {
                var reply = Start(client, character, session, ask, options);
                var done = await Within(reply.Handle.Completion, 120, "chat");
                CheckReply(reply, done, "turn " + (answers.Count + 1));
                answers.Add(done.Text);
            }

            var history = await Within(client.HistoryAsync(character, session), 30, "history");
            Check(history.Count == 4 && history[0].Role == "user" && history[0].Content == asks[0] &&
                  history[1].Role == "assistant" && history[1].Content == answers[0] &&
                  history[2].Content == asks[1] && history[3].Content == answers[1],
                  "history: both turns in order", history.Count + " messages");

            var first = Start(client, character, "console-a", "Good morning.", options);
            var second = Start(client, character, "console-b", "Any news?", options);
            var both = await Within(Task.WhenAll(first.Handle.Completion, second.Handle.Completion), 120, "two chats");
            Check(first.Tokens.ToString() == both[0].Text && second.Tokens.ToString() == both[1].Text &&
                  first.TokenCount > 0 && second.TokenCount > 0, "two chats at once: events routed by id");

            var cancelled = new TaskCompletionSource<bool>();
            var longReply = Start(client, character, "console-cancel", "Tell me a very long story.",
                new ChatOptions { MaxTokens = LongReply, Temperature = 0.8, Seed = 11 },
                r => r.Handle.CancelAsync().ContinueWith(
                    t => cancelled.SetResult(t.Status == TaskStatus.RanToCompletion && t.Result)));
            var cut = await Within(longReply.Handle.Completion, 120, "cancelled chat");
            bool acknowledged = await Within(cancelled.Task, 30, "cancel");
            Check(acknowledged && cut.FinishReason == "cancelled" && cut.CompletionTokens < LongReply &&
                  longReply.Tokens.ToString() == cut.Text, "cancel: reply stopped early",
                  cut.FinishReason + " after " + cut.CompletionTokens + " tokens, acknowledged=" + acknowledged);

            await Within(client.ResetAsync(character, session), 30, "reset");
            var empty = await Within(client.HistoryAsync(character, session), 30, "history");
            Check(empty.Count == 0, "reset: history forgotten", empty.Count + " messages");

            string errorCode = null;
            var bad = client.Chat("no-such-character", session, "hi", null, onError: e => errorCode = e.Code);
            try
            {
                await Within(bad.Completion, 30, "bad chat");
                Check(false, "error: unknown character refused", "the chat succeeded");
            }
            catch (NpcForgeException e)
            {
                Check(e.Code == "unknown_character" && errorCode == "unknown_character",
                      "error: unknown character refused", e.Code + " / " + errorCode);
            }
            return character;
        }
    }

    // Closing the client mid-reply must fail that reply with "disconnected", not leave it hanging.
    static async Task DisconnectCheck(string host, int port, string character)
    {
        var client = await Within(NpcForgeClient.ConnectAsync(host, port, Token), 30, "connect");
        var disconnected = new TaskCompletionSource<Exception>();
        client.Disconnected += e => disconnected.TrySetResult(e);
        await Within(client.ResetAsync(character, "console-disconnect"), 30, "reset");
        var reply = Start(client, character, "console-disconnect", "Tell me a very long story.",
                          new ChatOptions { MaxTokens = LongReply, Seed = 3 }, r => client.Dispose());
        string code = null;
        try
        {
            await Within(reply.Handle.Completion, 60, "chat on a closed client");
        }
        catch (NpcForgeException e)
        {
            code = e.Code;
        }
        var reason = await Within(disconnected.Task, 30, "Disconnected event");
        Check(code == "disconnected" && reason == null, "dispose: reply in flight fails as disconnected",
              "code " + code + ", reason " + reason);
    }

    static string Wire(Dictionary<string, object> o, string key)
    {
        object v;
        return o.TryGetValue(key, out v)
            ? Convert.ToString(v, System.Globalization.CultureInfo.InvariantCulture) : null;
    }

    static int Main(string[] args)
    {
        bool spawn = args.Length >= 3 && args[0] == "--spawn";
        if (args.Length < 2 || (args[0] == "--spawn" && !spawn))
        {
            Console.Error.WriteLine("usage: ConsoleTest.exe HOST PORT [CHARACTER]\n" +
                                    "       ConsoleTest.exe --spawn EXECUTABLE \"ARGUMENTS\" [CHARACTER]\n" +
                                    "(--spawn starts `EXECUTABLE ARGUMENTS --port 0 --ready-file ...` itself, e.g.\n" +
                                    " --spawn npcforge \"serve dist/\")");
            return 2;
        }
        JsonChecks();
        NpcForgeServer server = null;
        try
        {
            string host = spawn ? null : args[0];
            int port = spawn ? 0 : int.Parse(args[1]);
            string character = args.Length > (spawn ? 3 : 2) ? args[spawn ? 3 : 2] : null;
            if (spawn)
            {
                server = NpcForgeServer.StartAsync(args[1], args[2]).GetAwaiter().GetResult();
                Check(server.Port > 0 && server.Characters.Count > 0, "server: started as a child process",
                      server.Host + ":" + server.Port);
                host = server.Host;
                port = server.Port;
            }
            character = ServerChecks(host, port, character).GetAwaiter().GetResult();
            DisconnectCheck(host, port, character).GetAwaiter().GetResult();
        }
        catch (Exception e)
        {
            Check(false, "server checks", e.GetType().Name + ": " + e.Message);
        }
        finally
        {
            if (server != null)
            {
                server.Dispose();
                Check(server.Process.HasExited, "server: stopped");
            }
        }
        Console.WriteLine(failed == 0 ? "ALL CHECKS PASSED (" + passed + ")" : failed + " CHECK(S) FAILED");
        return failed == 0 ? 0 : 1;
    }
}

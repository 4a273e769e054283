// NpcForgeClient.cs: the npcforge C# client (Unity and any .NET Standard 2.1 runtime; no Unity APIs here).
//
// Speaks docs/protocol.md version 1: NDJSON over one TCP connection to `npcforge serve`. Input: host, port and
// an optional token; requests made through the methods below. Output: Tasks that complete with each request's
// answer, and per-chat callbacks (token, sentence, done, error) for streamed replies.
//
// Threading: one background reader thread parses every server line and dispatches it by request id. All
// callbacks, and the completion of the returned Tasks, run on that thread (Task continuations are scheduled
// asynchronously, so an `await` in Unity resumes on the main thread through Unity's SynchronizationContext).
// Callbacks must not touch Unity objects directly: queue the work (see Unity/NpcForgeBehaviour.cs).
// Requests may be sent from any thread; writes are serialised by a lock.
using System;
using System.Collections.Generic;
using System.IO;
using System.Net.Sockets;
using System.Text;
using System.Threading;
using System.Threading.Tasks;

namespace NpcForge
{
    /// <summary>One chat in flight: its request id, its completion, and a way to stop it.</summary>
    public sealed class ChatHandle
    {
        readonly NpcForgeClient client;
        public readonly long Id;
        public readonly Task<ChatResult> Completion;

        internal ChatHandle(NpcForgeClient client, long id, Task<ChatResult> completion)
        {
            this.client = client;
            Id = id;
            Completion = completion;
        }

        /// <summary>Asks the server to stop this reply; it then ends with FinishReason "cancelled".
        /// Completes with false when the reply had already finished (the race is normal).</summary>
        public Task<bool> CancelAsync() { return client.CancelAsync(Id); }

        /// <summary>Fire-and-forget CancelAsync, safe to call from any thread and any number of times.</summary>
        public void Cancel() { CancelAsync().ContinueWith(t => { var _ = t.Exception; }, TaskScheduler.Default); }
    }

    public sealed class NpcForgeClient : IDisposable
    {
        public const int ProtocolVersion = 1;
        // Server lines are bounded by the reply sizes the protocol allows; anything far beyond that is garbage.
        const int MaxLineBytes = 16 * 1024 * 1024;
        static readonly UTF8Encoding Utf8 = new UTF8Encoding(false);

        readonly TcpClient tcp;
        readonly NetworkStream stream;
        readonly object writeLock = new object();
        readonly object pendingLock = new object();
        readonly Dictionary<string, Pending> pending = new Dictionary<string, Pending>();
        readonly Thread reader;
        long nextId;
        bool closed;

        /// <summary>The `hello` answer: protocol, server, authenticated, auth_required, limits.</summary>
        public Dictionary<string, object> ServerInfo { get; private set; }

        /// <summary>Raised on the reader thread for what belongs to no request: error events without a known
        /// id (bad_json, line_too_long), unparseable server lines, and exceptions thrown by your callbacks.</summary>
        public event Action<Exception> BackgroundError;

        /// <summary>Raised once on the reader thread when the connection ends (null after Dispose).
        /// Every request still in flight then fails with code "disconnected".</summary>
        public event Action<Exception> Disconnected;

        NpcForgeClient(TcpClient tcp)
        {
            this.tcp = tcp;
            stream = tcp.GetStream();
            reader = new Thread(ReadLoop) { IsBackground = true, Name = "npcforge-reader" };
            reader.Start();
        }

        /// <summary>Connects, says hello (with the token when the server needs one) and returns the client.
        /// Fails with NpcForgeException: connect_failed, unauthorized (wrong or missing token), ...</summary>
        public static async Task<NpcForgeClient> ConnectAsync(string host, int port, string token = null,
                                                              string clientName = "npcforge-csharp")
        {
            var tcp = new TcpClient { NoDelay = true };
            try
            {
                await tcp.ConnectAsync(host, port).ConfigureAwait(false);
            }
            catch (SocketException e)
            {
                tcp.Close();
                throw new NpcForgeException("connect_failed", "cannot connect to " + host + ":" + port +
                                            " (is npcforge serve running?): " + e.Message);
            }
            var client = new NpcForgeClient(tcp);
            try
            {
                var hello = new Dictionary<string, object> { { "version", ProtocolVersion }, { "client", clientName } };
                if (token != null) hello["token"] = token;
                client.ServerInfo = await client.RequestAsync("hello", hello).ConfigureAwait(false);
                if (Wire.Num(client.ServerInfo, "protocol") < ProtocolVersion)
                    throw new NpcForgeException("bad_response", "server speaks protocol " +
                                                client.ServerInfo["protocol"] + ", this client needs " +
                                                ProtocolVersion);
                return client;
            }
            catch
            {
                client.Dispose();
                throw;
            }
        }

        /// <summary>Sends any non-chat request and completes with its `result.data`.</summary>
        public Task<Dictionary<string, object>> RequestAsync(string op, IDictionary<string, object> fields = null)
        {
            long id = Interlocked.Increment(ref nextId);
            var request = new Dictionary<string, object> { { "id", id }, { "op", op } };
            if (fields != null)
                foreach (var kv in fields) request[kv.Key] = kv.Value;
            var p = new RequestPending();
            Send(id, request, p);
            return p.Tcs.Task;
        }

        public async Task<List<CharacterInfo>> ListAsync()
        {
            var data = await RequestAsync("list").ConfigureAwait(false);
            var result = new List<CharacterInfo>();
            foreach (object item in Wire.Arr(data, "characters"))
            {
                var c = item as Dictionary<string, object>;
                if (c == null) throw new FormatException("server message: a 'characters' entry is not an object");
                result.Add(new CharacterInfo
                {
                    Id = Wire.Str(c, "id"), Name = Wire.Str(c, "name"),
                    Greeting = Wire.Str(c, "greeting"), Loaded = Wire.Bool(c, "loaded"),
                });
            }
            return result;
        }

        public Task LoadAsync(string character)
        {
            return RequestAsync("load", new Dictionary<string, object> { { "character", character } });
        }

        public Task UnloadAsync(string character)
        {
            return RequestAsync("unload", new Dictionary<string, object> { { "character", character } });
        }

        /// <summary>Forgets the conversation (character, session).</summary>
        public Task ResetAsync(string character, string session)
        {
            return RequestAsync("reset", Conversation(character, session));
        }

        public async Task<List<ChatMessage>> HistoryAsync(string character, string session)
        {
            var data = await RequestAsync("history", Conversation(character, session)).ConfigureAwait(false);
            var result = new List<ChatMessage>();
            foreach (object item in Wire.Arr(data, "messages"))
            {
                var m = item as Dictionary<string, object>;
                if (m == null) throw new FormatException("server message: a 'messages' entry is not an object");
                result.Add(new ChatMessage { Role = Wire.Str(m, "role"), Content = Wire.Str(m, "content") });
            }
            return result;
        }

        public Task<Dictionary<string, object>> StatsAsync() { return RequestAsync("stats"); }

        /// <summary>Starts a reply from `character` in conversation `session`. Callbacks (each may be null) run
        /// on the reader thread: onToken per streamed piece, onSentence per finished sentence (for TTS), then
        /// exactly one of onDone / onError. The handle's Completion task ends the same way.</summary>
        public ChatHandle Chat(string character, string session, string text, ChatOptions options = null,
                               Action<string> onToken = null, Action<string> onSentence = null,
                               Action<ChatResult> onDone = null, Action<NpcForgeException> onError = null)
        {
            long id = Interlocked.Increment(ref nextId);
            var request = Conversation(character, session);
            request["id"] = id;
            request["op"] = "chat";
            request["text"] = text;
            (options ?? new ChatOptions()).AddTo(request);
            var p = new ChatPending(this, onToken, onSentence, onDone, onError);
            Send(id, request, p);
            return new ChatHandle(this, id, p.Tcs.Task);
        }

        /// <summary>Cancels the chat with id `chatId`; false when it had already finished.</summary>
        public async Task<bool> CancelAsync(long chatId)
        {
            try
            {
                var target = new Dictionary<string, object> { { "target", chatId } };
                await RequestAsync("cancel", target).ConfigureAwait(false);
                return true;
            }
            catch (NpcForgeException e)
            {
                if (e.Code == "not_found") return false;
                throw;
            }
        }

        /// <summary>Closes the connection; requests in flight fail with code "disconnected".</summary>
        public void Dispose()
        {
            lock (pendingLock) closed = true;
            tcp.Close();
        }

        static Dictionary<string, object> Conversation(string character, string session)
        {
            return new Dictionary<string, object> { { "character", character }, { "session", session } };
        }

        void Send(long id, Dictionary<string, object> request, Pending p)
        {
            byte[] line = Utf8.GetBytes(Json.Write(request) + "\n");
            string key = Json.Write(id);
            // Registered before writing: the answer may arrive before Write returns.
            lock (pendingLock)
            {
                if (closed)
                {
                    p.Fail(new NpcForgeException("disconnected", "the connection is closed"));
                    return;
                }
                pending[key] = p;
            }
            try
            {
                lock (writeLock) stream.Write(line, 0, line.Length);
            }
            catch (Exception e) when (e is IOException || e is ObjectDisposedException || e is SocketException)
            {
                lock (pendingLock) pending.Remove(key);
                p.Fail(new NpcForgeException("disconnected", e.Message));
            }
        }

        void ReadLoop()
        {
            Exception reason = null;
            var buffer = new byte[8192];
            var line = new MemoryStream();
            try
            {
                while (true)
                {
                    int n = stream.Read(buffer, 0, buffer.Length);
                    if (n <= 0) break;
                    int start = 0;
                    for (int i = 0; i < n; i++)
                    {
                        if (buffer[i] != (byte)'\n') continue;
                        line.Write(buffer, start, i - start);
                        // Decoding whole lines keeps multi-byte characters split across reads intact.
                        Dispatch(Utf8.GetString(line.GetBuffer(), 0, (int)line.Length));
                        line.SetLength(0);
                        start = i + 1;
                    }
                    line.Write(buffer, start, n - start);
                    if (line.Length > MaxLineBytes)
                        throw new IOException("server line longer than " + MaxLineBytes + " bytes");
                }
            }
            catch (Exception e)
            {
                bool disposed;
                lock (pendingLock) disposed = closed;
                if (!disposed) reason = e;
            }
            List<Pending> orphans;
            lock (pendingLock)
            {
                closed = true;
                orphans = new List<Pending>(pending.Values);
                pending.Clear();
            }
            tcp.Close();
            var error = new NpcForgeException("disconnected", reason != null ? reason.Message : "connection closed");
            foreach (var p in orphans) p.Fail(error);
            var handler = Disconnected;
            if (handler != null) handler(reason);
        }

        void Dispatch(string text)
        {
            if (text.Trim().Length == 0) return;
            Dictionary<string, object> ev;
            string key;
            try
            {
                ev = Json.Parse(text) as Dictionary<string, object>;
                if (ev == null || !ev.ContainsKey("event"))
                    throw new FormatException("server line is not an event: " + text);
                key = Json.Write(ev.ContainsKey("id") ? ev["id"] : null);
            }
            catch (FormatException e)
            {
                ReportBackground(e);
                return;
            }
            Pending p;
            lock (pendingLock) pending.TryGetValue(key, out p);
            if (p == null)
            {
                if ((ev["event"] as string) == "error")
                    ReportBackground(ErrorOf(ev));
                return;
            }
            bool finished;
            try
            {
                finished = p.Handle(ev);
            }
            catch (FormatException e)
            {
                finished = true;
                p.Fail(new NpcForgeException("bad_response", e.Message));
            }
            if (finished)
                lock (pendingLock) pending.Remove(key);
        }

        internal void ReportBackground(Exception e)
        {
            var handler = BackgroundError;
            if (handler == null) return;
            try { handler(e); }
            catch { /* a failing error handler must not kill the reader thread */ }
        }

        internal static NpcForgeException ErrorOf(Dictionary<string, object> ev)
        {
            object code, message;
            ev.TryGetValue("code", out code);
            ev.TryGetValue("message", out message);
            return new NpcForgeException(code as string ?? "internal", message as string ?? "(no message)");
        }

        abstract class Pending
        {
            /// <summary>Handles one event for this request; true when the request is finished.</summary>
            public abstract bool Handle(Dictionary<string, object> ev);
            public abstract void Fail(NpcForgeException error);
        }

        sealed class RequestPending : Pending
        {
            public readonly TaskCompletionSource<Dictionary<string, object>> Tcs =
                new TaskCompletionSource<Dictionary<string, object>>(
                    TaskCreationOptions.RunContinuationsAsynchronously);

            public override bool Handle(Dictionary<string, object> ev)
            {
                var kind = ev["event"] as string;
                if (kind == "error") { Tcs.TrySetException(ErrorOf(ev)); return true; }
                if (kind != "result") return false;
                Tcs.TrySetResult(Wire.Obj(ev, "data"));
                return true;
            }

            public override void Fail(NpcForgeException error) { Tcs.TrySetException(error); }
        }

        sealed class ChatPending : Pending
        {
            readonly NpcForgeClient client;
            readonly Action<string> onToken, onSentence;
            readonly Action<ChatResult> onDone;
            readonly Action<NpcForgeException> onError;
            public readonly TaskCompletionSource<ChatResult> Tcs =
                new TaskCompletionSource<ChatResult>(TaskCreationOptions.RunContinuationsAsynchronously);

            public ChatPending(NpcForgeClient client, Action<string> onToken, Action<string> onSentence,
                               Action<ChatResult> onDone, Action<NpcForgeException> onError)
            {
                this.client = client;
                this.onToken = onToken;
                this.onSentence = onSentence;
                this.onDone = onDone;
                this.onError = onError;
            }

            public override bool Handle(Dictionary<string, object> ev)
            {
                switch (ev["event"] as string)
                {
                    case "token":
                        Invoke(onToken, Wire.Str(ev, "text"));
                        return false;
                    case "sentence":
                        Invoke(onSentence, Wire.Str(ev, "text"));
                        return false;
                    case "done":
                        var result = ChatResult.FromEvent(ev);
                        Invoke(onDone, result);
                        Tcs.TrySetResult(result);
                        return true;
                    case "error":
                        Fail(ErrorOf(ev));
                        return true;
                    default:
                        return false;
                }
            }

            public override void Fail(NpcForgeException error)
            {
                if (Tcs.Task.IsCompleted) return;
                Invoke(onError, error);
                Tcs.TrySetException(error);
            }

            void Invoke<T>(Action<T> callback, T value)
            {
                if (callback == null) return;
                try { callback(value); }
                catch (Exception e) { client.ReportBackground(e); }
            }
        }
    }
}

// NpcForgeBehaviour.cs: optional Unity component around NpcForgeClient whose callbacks run on the main thread.
//
// Needs UnityEngine, so CI does not compile it (the core in Runtime/ is checked with plain Mono). The client's
// callbacks run on its reader thread, where Unity objects must not be touched; this component queues them in a
// ConcurrentQueue and runs them in Update(). Inspector fields: host, port, token (empty = none).
using System;
using System.Collections.Concurrent;
using NpcForge;
using UnityEngine;

public class NpcForgeBehaviour : MonoBehaviour
{
    public string host = "127.0.0.1";
    public int port = 7411;
    public string token = "";

    /// <summary>Null until connected; check IsConnected before chatting.</summary>
    public NpcForgeClient Client { get; private set; }
    public bool IsConnected { get { return Client != null; } }

    readonly ConcurrentQueue<Action> mainThread = new ConcurrentQueue<Action>();

    async void Start()
    {
        try
        {
            // Awaited on the main thread, so the code after it resumes there too (UnitySynchronizationContext).
            var client = await NpcForgeClient.ConnectAsync(host, port, string.IsNullOrEmpty(token) ? null : token,
                                                           "unity " + Application.unityVersion);
            client.BackgroundError += e => Post(() => Debug.LogWarning("npcforge: " + e.Message));
            client.Disconnected += e => Post(() =>
            {
                Debug.LogWarning("npcforge: disconnected" + (e != null ? ": " + e.Message : ""));
                Client = null;
            });
            Client = client;
        }
        catch (Exception e)
        {
            Debug.LogError("npcforge: cannot connect to " + host + ":" + port + ": " + e.Message);
        }
    }

    /// <summary>Runs `action` on the main thread during the next Update.</summary>
    public void Post(Action action) { mainThread.Enqueue(action); }

    void Update()
    {
        Action action;
        while (mainThread.TryDequeue(out action)) action();
    }

    /// <summary>NpcForgeClient.Chat with every callback moved to the main thread, so they may touch
    /// GameObjects and UI. Cancel the returned handle to stop the reply.</summary>
    public ChatHandle Say(string character, string session, string text, ChatOptions options = null,
                          Action<string> onToken = null, Action<string> onSentence = null,
                          Action<ChatResult> onDone = null, Action<NpcForgeException> onError = null)
    {
        if (Client == null) throw new InvalidOperationException("npcforge: not connected yet");
        return Client.Chat(character, session, text, options,
            onToken == null ? (Action<string>)null : t => Post(() => onToken(t)),
            onSentence == null ? (Action<string>)null : s => Post(() => onSentence(s)),
            onDone == null ? (Action<ChatResult>)null : r => Post(() => onDone(r)),
            onError == null ? (Action<NpcForgeException>)null : e => Post(() => onError(e)));
    }

    void OnDestroy()
    {
        if (Client != null) Client.Dispose();
        Client = null;
    }
}

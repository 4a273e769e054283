// NpcForgeTypes.cs: the plain records of the npcforge C# client: chat options in, chat results, characters,
// history messages and errors out. They mirror docs/protocol.md (version 1) field for field.
using System;
using System.Collections.Generic;
using System.Globalization;

namespace NpcForge
{
    /// <summary>A failed request: Code is the protocol's error code (unknown_character, bad_request, ...),
    /// "disconnected" when the connection ended before the answer came, "connect_failed" when it never opened,
    /// "bad_response" for a malformed server message.</summary>
    public sealed class NpcForgeException : Exception
    {
        public readonly string Code;

        public NpcForgeException(string code, string message) : base(code + ": " + message)
        {
            Code = code;
        }
    }

    /// <summary>Sampling settings of one chat; a null field is left to the server's default.</summary>
    public sealed class ChatOptions
    {
        public int? MaxTokens;
        public double? Temperature;
        public double? TopP;
        public int? TopK;
        public double? RepetitionPenalty;
        public IList<string> Stop;
        public long? Seed;
        public bool Stream = true;

        internal void AddTo(Dictionary<string, object> request)
        {
            if (MaxTokens.HasValue) request["max_tokens"] = MaxTokens.Value;
            if (Temperature.HasValue) request["temperature"] = Temperature.Value;
            if (TopP.HasValue) request["top_p"] = TopP.Value;
            if (TopK.HasValue) request["top_k"] = TopK.Value;
            if (RepetitionPenalty.HasValue) request["repetition_penalty"] = RepetitionPenalty.Value;
            if (Stop != null) request["stop"] = new List<string>(Stop);
            if (Seed.HasValue) request["seed"] = Seed.Value;
            request["stream"] = Stream;
        }
    }

    /// <summary>The `done` event of a chat. FinishReason: stop, length, cancelled or shutdown.</summary>
    public sealed class ChatResult
    {
        public string FinishReason;
        public string Text;
        public long PromptTokens;
        public long CompletionTokens;
        public double TtftS;
        public double TokensPerS;
        public double TotalS;
        public bool TruncatedHistory;

        internal static ChatResult FromEvent(Dictionary<string, object> ev)
        {
            var usage = Wire.Obj(ev, "usage");
            var timings = Wire.Obj(ev, "timings");
            return new ChatResult
            {
                FinishReason = Wire.Str(ev, "finish_reason"),
                Text = Wire.Str(ev, "text"),
                PromptTokens = (long)Wire.Num(usage, "prompt_tokens"),
                CompletionTokens = (long)Wire.Num(usage, "completion_tokens"),
                TtftS = Wire.Num(timings, "ttft_s"),
                TokensPerS = Wire.Num(timings, "tokens_per_s"),
                TotalS = Wire.Num(timings, "total_s"),
                TruncatedHistory = ev.ContainsKey("truncated_history") && ev["truncated_history"] is bool &&
                                   (bool)ev["truncated_history"],
            };
        }
    }

    /// <summary>One entry of `list`.</summary>
    public sealed class CharacterInfo
    {
        public string Id;
        public string Name;
        public string Greeting;
        public bool Loaded;
    }

    /// <summary>One turn of `history`: Role is "user" or "assistant".</summary>
    public sealed class ChatMessage
    {
        public string Role;
        public string Content;
    }

    /// <summary>Typed reads of parsed protocol objects; a missing or mistyped field is a protocol error.</summary>
    internal static class Wire
    {
        public static Dictionary<string, object> Obj(Dictionary<string, object> o, string key)
        {
            object v;
            var d = o.TryGetValue(key, out v) ? v as Dictionary<string, object> : null;
            if (d == null) throw new FormatException("server message: '" + key + "' is not an object");
            return d;
        }

        public static List<object> Arr(Dictionary<string, object> o, string key)
        {
            object v;
            var a = o.TryGetValue(key, out v) ? v as List<object> : null;
            if (a == null) throw new FormatException("server message: '" + key + "' is not an array");
            return a;
        }

        public static string Str(Dictionary<string, object> o, string key)
        {
            object v;
            var s = o.TryGetValue(key, out v) ? v as string : null;
            if (s == null) throw new FormatException("server message: '" + key + "' is not a string");
            return s;
        }

        public static double Num(Dictionary<string, object> o, string key)
        {
            object v;
            if (!o.TryGetValue(key, out v) || !(v is long || v is double))
                throw new FormatException("server message: '" + key + "' is not a number");
            return Convert.ToDouble(v, CultureInfo.InvariantCulture);
        }

        public static bool Bool(Dictionary<string, object> o, string key)
        {
            object v;
            if (!o.TryGetValue(key, out v) || !(v is bool))
                throw new FormatException("server message: '" + key + "' is not a boolean");
            return (bool)v;
        }
    }
}

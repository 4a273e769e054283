// NpcForgeJson.cs: the small JSON reader/writer the npcforge C# client speaks the wire protocol with.
//
// Input: one JSON text (a protocol line). Output: plain .NET values, namely null, bool, long (integers that fit),
// double (other numbers), string, List<object> (arrays) and Dictionary<string, object> (objects).
// Write() turns the same kinds of values (plus any IDictionary / IEnumerable, ints and floats) back into
// compact JSON. Unity's JsonUtility cannot represent dynamic objects and the client must not depend on
// Newtonsoft, hence this file. Strings are escaped per RFC 8259; \uXXXX escapes, surrogate pairs included,
// decode to the UTF-16 a C# string holds.
using System;
using System.Collections;
using System.Collections.Generic;
using System.Globalization;
using System.Text;

namespace NpcForge
{
    public static class Json
    {
        // Nesting deeper than this is refused rather than risking a stack overflow on hostile input.
        const int MaxDepth = 128;

        public static object Parse(string text)
        {
            if (text == null) throw new ArgumentNullException("text");
            var p = new Parser(text);
            p.SkipWhitespace();
            object value = p.ParseValue(0);
            p.SkipWhitespace();
            if (p.Pos != text.Length) throw p.Error("unexpected text after the JSON value");
            return value;
        }

        public static string Write(object value)
        {
            var sb = new StringBuilder();
            WriteValue(sb, value, 0);
            return sb.ToString();
        }

        static void WriteValue(StringBuilder sb, object value, int depth)
        {
            if (depth > MaxDepth) throw new ArgumentException("JSON value nested too deeply");
            if (value == null) { sb.Append("null"); return; }
            var s = value as string;
            if (s != null) { WriteString(sb, s); return; }
            if (value is bool) { sb.Append((bool)value ? "true" : "false"); return; }
            if (value is char) { WriteString(sb, value.ToString()); return; }
            if (value is int || value is long || value is short || value is sbyte || value is byte ||
                value is uint || value is ulong || value is ushort)
            {
                sb.Append(Convert.ToString(value, CultureInfo.InvariantCulture));
                return;
            }
            if (value is double || value is float || value is decimal)
            {
                double d = Convert.ToDouble(value, CultureInfo.InvariantCulture);
                if (double.IsNaN(d) || double.IsInfinity(d))
                    throw new ArgumentException("JSON has no NaN or Infinity: " + d);
                // "R" round-trips a double exactly; the invariant culture keeps the '.' decimal point.
                sb.Append(d.ToString("R", CultureInfo.InvariantCulture));
                return;
            }
            var dict = value as IDictionary;
            if (dict != null)
            {
                sb.Append('{');
                bool first = true;
                foreach (DictionaryEntry e in dict)
                {
                    if (!first) sb.Append(',');
                    first = false;
                    var key = e.Key as string;
                    if (key == null) throw new ArgumentException("JSON object keys must be strings");
                    WriteString(sb, key);
                    sb.Append(':');
                    WriteValue(sb, e.Value, depth + 1);
                }
                sb.Append('}');
                return;
            }
            var list = value as IEnumerable;
            if (list != null)
            {
                sb.Append('[');
                bool first = true;
                foreach (object item in list)
                {
                    if (!first) sb.Append(',');
                    first = false;
                    WriteValue(sb, item, depth + 1);
                }
                sb.Append(']');
                return;
            }
            throw new ArgumentException("cannot write a " + value.GetType().Name + " as JSON");
        }

        /// <summary>Appends s as a JSON string literal. Non-ASCII text stays raw (the wire is UTF-8);
        /// control characters and lone surrogates (which UTF-8 cannot carry) become \uXXXX.</summary>
        public static void WriteString(StringBuilder sb, string s)
        {
            sb.Append('"');
            for (int i = 0; i < s.Length; i++)
            {
                char c = s[i];
                switch (c)
                {
                    case '"': sb.Append("\\\""); break;
                    case '\\': sb.Append("\\\\"); break;
                    case '\b': sb.Append("\\b"); break;
                    case '\f': sb.Append("\\f"); break;
                    case '\n': sb.Append("\\n"); break;
                    case '\r': sb.Append("\\r"); break;
                    case '\t': sb.Append("\\t"); break;
                    default:
                        if (c < 0x20 || c == '\u2028' || c == '\u2029')
                        {
                            AppendEscape(sb, c);
                        }
                        else if (char.IsHighSurrogate(c) && i + 1 < s.Length && char.IsLowSurrogate(s[i + 1]))
                        {
                            sb.Append(c).Append(s[i + 1]);
                            i++;
                        }
                        else if (char.IsSurrogate(c))
                        {
                            AppendEscape(sb, c);
                        }
                        else
                        {
                            sb.Append(c);
                        }
                        break;
                }
            }
            sb.Append('"');
        }

        static void AppendEscape(StringBuilder sb, char c)
        {
            sb.Append("\\u").Append(((int)c).ToString("x4", CultureInfo.InvariantCulture));
        }

        sealed class Parser
        {
            readonly string text;
            public int Pos;

            public Parser(string text) { this.text = text; }

            public FormatException Error(string message)
            {
                return new FormatException("invalid JSON at character " + Pos + ": " + message);
            }

            public void SkipWhitespace()
            {
                while (Pos < text.Length)
                {
                    char c = text[Pos];
                    if (c != ' ' && c != '\t' && c != '\n' && c != '\r') break;
                    Pos++;
                }
            }

            public object ParseValue(int depth)
            {
                if (depth > MaxDepth) throw Error("nested too deeply");
                if (Pos >= text.Length) throw Error("unexpected end of text");
                char c = text[Pos];
                switch (c)
                {
                    case '{': return ParseObject(depth);
                    case '[': return ParseArray(depth);
                    case '"': return ParseString();
                    case 't': Expect("true"); return true;
                    case 'f': Expect("false"); return false;
                    case 'n': Expect("null"); return null;
                    default:
                        if (c == '-' || (c >= '0' && c <= '9')) return ParseNumber();
                        throw Error("unexpected character '" + c + "'");
                }
            }

            void Expect(string word)
            {
                if (string.CompareOrdinal(text, Pos, word, 0, word.Length) != 0) throw Error("expected " + word);
                Pos += word.Length;
            }

            Dictionary<string, object> ParseObject(int depth)
            {
                var result = new Dictionary<string, object>();
                Pos++; // '{'
                SkipWhitespace();
                if (Pos < text.Length && text[Pos] == '}') { Pos++; return result; }
                while (true)
                {
                    SkipWhitespace();
                    if (Pos >= text.Length || text[Pos] != '"') throw Error("expected a string key");
                    string key = ParseString();
                    SkipWhitespace();
                    if (Pos >= text.Length || text[Pos] != ':') throw Error("expected ':'");
                    Pos++;
                    SkipWhitespace();
                    result[key] = ParseValue(depth + 1);
                    SkipWhitespace();
                    if (Pos >= text.Length) throw Error("unterminated object");
                    if (text[Pos] == ',') { Pos++; continue; }
                    if (text[Pos] == '}') { Pos++; return result; }
                    throw Error("expected ',' or '}'");
                }
            }

            List<object> ParseArray(int depth)
            {
                var result = new List<object>();
                Pos++; // '['
                SkipWhitespace();
                if (Pos < text.Length && text[Pos] == ']') { Pos++; return result; }
                while (true)
                {
                    SkipWhitespace();
                    result.Add(ParseValue(depth + 1));
                    SkipWhitespace();
                    if (Pos >= text.Length) throw Error("unterminated array");
                    if (text[Pos] == ',') { Pos++; continue; }
                    if (text[Pos] == ']') { Pos++; return result; }
                    throw Error("expected ',' or ']'");
                }
            }

            string ParseString()
            {
                Pos++; // opening quote
                var sb = new StringBuilder();
                while (true)
                {
                    if (Pos >= text.Length) throw Error("unterminated string");
                    char c = text[Pos++];
                    if (c == '"') return sb.ToString();
                    if (c < 0x20) throw Error("raw control character in string");
                    if (c != '\\') { sb.Append(c); continue; }
                    if (Pos >= text.Length) throw Error("unterminated escape");
                    char e = text[Pos++];
                    switch (e)
                    {
                        case '"': sb.Append('"'); break;
                        case '\\': sb.Append('\\'); break;
                        case '/': sb.Append('/'); break;
                        case 'b': sb.Append('\b'); break;
                        case 'f': sb.Append('\f'); break;
                        case 'n': sb.Append('\n'); break;
                        case 'r': sb.Append('\r'); break;
                        case 't': sb.Append('\t'); break;
                        // A surrogate pair arrives as two escapes; appending both UTF-16 units rebuilds it.
                        case 'u': sb.Append(ParseHex4()); break;
                        default: throw Error("bad escape \\" + e);
                    }
                }
            }

            char ParseHex4()
            {
                if (Pos + 4 > text.Length) throw Error("truncated \\u escape");
                int v = 0;
                for (int i = 0; i < 4; i++)
                {
                    char h = text[Pos++];
                    int d = h >= '0' && h <= '9' ? h - '0'
                          : h >= 'a' && h <= 'f' ? h - 'a' + 10
                          : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
                    if (d < 0) throw Error("bad hex digit in \\u escape");
                    v = v * 16 + d;
                }
                return (char)v;
            }

            object ParseNumber()
            {
                int start = Pos;
                if (text[Pos] == '-') Pos++;
                if (Pos >= text.Length) throw Error("bad number");
                if (text[Pos] == '0') Pos++;
                else if (text[Pos] >= '1' && text[Pos] <= '9') SkipDigits();
                else throw Error("bad number");
                bool integral = true;
                if (Pos < text.Length && text[Pos] == '.')
                {
                    integral = false;
                    Pos++;
                    if (Pos >= text.Length || !IsDigit(text[Pos])) throw Error("digit expected after '.'");
                    SkipDigits();
                }
                if (Pos < text.Length && (text[Pos] == 'e' || text[Pos] == 'E'))
                {
                    integral = false;
                    Pos++;
                    if (Pos < text.Length && (text[Pos] == '+' || text[Pos] == '-')) Pos++;
                    if (Pos >= text.Length || !IsDigit(text[Pos])) throw Error("digit expected in exponent");
                    SkipDigits();
                }
                string literal = text.Substring(start, Pos - start);
                long l;
                if (integral &&
                    long.TryParse(literal, NumberStyles.AllowLeadingSign, CultureInfo.InvariantCulture, out l))
                    return l;
                return double.Parse(literal, NumberStyles.Float, CultureInfo.InvariantCulture);
            }

            void SkipDigits()
            {
                while (Pos < text.Length && IsDigit(text[Pos])) Pos++;
            }

            static bool IsDigit(char c) { return c >= '0' && c <= '9'; }
        }
    }
}
